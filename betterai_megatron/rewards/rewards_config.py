"""The ``rewards`` config section (:class:`RewardsConfig`): which reward, shaping, filter and curriculum to use.

Every choice is a registered name (see :mod:`.registry`); ``validate()`` checks them against the registries and
names the offending ``rewards.<key>``. Example::

    rewards:
      test_reward: fraction          # binary | fraction
      test_mode: auto                # check | cases | auto
      format_weight: 0.1             # + weight * format reward (<think>...</think> then one code block)
      code_extraction: auto          # fenced | raw | auto
      advantage_weighting: grpo_lead # none | grpo_lead
      group_filter: dapo             # none | dapo
      length_penalty: dapo_overlong  # none | dapo_overlong
      overlong_max_tokens: 1024
      overlong_cache_tokens: 256
      curriculum: {weighting: learnability, unlock_pass_rate: 0.8}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from betterai_megatron.rewards.curriculum import CURRICULUM_WEIGHTS
from betterai_megatron.rewards.difficulty_weighting import ADVANTAGE_WEIGHTINGS
from betterai_megatron.rewards.dynamic_sampling import GROUP_FILTERS
from betterai_megatron.rewards.executor import TEST_MODES
from betterai_megatron.rewards.format_reward import EXTRACTION_MODES
from betterai_megatron.rewards.overlong_penalty import LENGTH_PENALTIES
from betterai_megatron.rewards.test_reward import TEST_REWARDS


@dataclass
class GrpoLeadConfig:
    """GRPO-LEAD's logistic weight ``A + (B - A) / (1 + exp(k (rho - rho0)))`` and where ``rho`` comes from."""

    min_weight: float = 0.4
    max_weight: float = 1.5
    midpoint: float = 0.75
    steepness: float = 10.0
    pass_rate_source: str = "group"  # group: this batch's group (the paper); running: the tracker's estimate


@dataclass
class CurriculumConfig:
    weighting: str = "uniform"  # uniform | learnability | target
    min_weight: float = 0.02
    target: float = 0.5
    width: float = 0.2
    unlock_pass_rate: float | None = None  # open level L+1 when level L's mean pass rate reaches this
    prior_strength: float = 4.0  # pass-rate tracker: weight of the label/level prior, in pseudo-samples
    decay: float = 1.0  # pass-rate tracker: forgetting factor per update (1 = never forget)


@dataclass
class RewardsConfig:
    test_reward: str = "binary"
    test_mode: str = "auto"
    error_reward: float = 0.0
    success_threshold: float = 1.0  # a sample with test reward >= this counts as correct (pass rates)
    format_weight: float = 0.0
    code_extraction: str = "auto"
    advantage_weighting: str = "none"
    grpo_lead: GrpoLeadConfig = field(default_factory=GrpoLeadConfig)
    group_filter: str = "none"
    length_penalty: str = "none"
    overlong_max_tokens: int = 1024
    overlong_cache_tokens: int = 256
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming ``rewards.<key>`` for an unknown name or an out-of-range value."""
        for key, registry in (("test_reward", TEST_REWARDS), ("advantage_weighting", ADVANTAGE_WEIGHTINGS),
                              ("group_filter", GROUP_FILTERS), ("length_penalty", LENGTH_PENALTIES),
                              ("curriculum.weighting", CURRICULUM_WEIGHTS)):
            value = self.curriculum.weighting if key == "curriculum.weighting" else getattr(self, key)
            if value not in registry:
                raise ValueError(f"rewards.{key}: {registry.unknown_name_message(value)}")
        if self.test_mode not in TEST_MODES:
            raise ValueError(f"rewards.test_mode must be one of {TEST_MODES}, got {self.test_mode!r}")
        if self.code_extraction not in EXTRACTION_MODES:
            raise ValueError(f"rewards.code_extraction must be one of {EXTRACTION_MODES}, got {self.code_extraction!r}")
        if self.grpo_lead.pass_rate_source not in ("group", "running"):
            raise ValueError("rewards.grpo_lead.pass_rate_source must be 'group' or 'running', "
                             f"got {self.grpo_lead.pass_rate_source!r}")
        if self.grpo_lead.min_weight > self.grpo_lead.max_weight:
            raise ValueError("rewards.grpo_lead.min_weight must not exceed rewards.grpo_lead.max_weight")
        if not 0 < self.overlong_cache_tokens <= self.overlong_max_tokens:
            raise ValueError("rewards.overlong_cache_tokens must be in (0, rewards.overlong_max_tokens]")
        if self.format_weight < 0:
            raise ValueError(f"rewards.format_weight must be >= 0, got {self.format_weight}")
        if self.curriculum.min_weight <= 0:
            raise ValueError(f"rewards.curriculum.min_weight must be > 0, got {self.curriculum.min_weight}")
        if not 0 < self.curriculum.decay <= 1:
            raise ValueError(f"rewards.curriculum.decay must be in (0, 1], got {self.curriculum.decay}")
        if self.test_reward == "fraction" and self.test_mode == "check":
            raise ValueError("rewards.test_reward=fraction needs rewards.test_mode=cases or auto (check mode runs "
                             "one test per program)")
