"""``GRPOLossConfig``: the config section ``grpo`` -- every knob of the GRPO algorithm math, nothing of orchestration.

Rollout sizes (``rollout.prompts_per_step``, ``rollout.samples_per_prompt``, ``rollout.tree.*``), mini-batch sizes
and the number of updates per step belong to the trainer's sections; this one only selects and parameterises the
pure functions of :mod:`advantages`, :mod:`policy_loss`, :mod:`kl` and :mod:`tree`. Names are checked against the
registries when the config is built, so a typo fails at load time with the key and the valid names.

Presets (YAML)::

    grpo: {advantage_estimator: grpo, loss_agg_mode: seq-mean-token-mean, clip_high: 0.2}   # original GRPO
    grpo: {advantage_estimator: grpo, loss_agg_mode: token-mean, clip_high: 0.28}           # DAPO (the default)
    grpo: {advantage_estimator: dr_grpo, loss_agg_mode: seq-mean-token-sum-norm,
           max_response_length_tokens: 1024}                                                # Dr. GRPO
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GRPOLossConfig:
    """The ``grpo`` config section. Defaults: DAPO-style GRPO without a reference model."""

    # Advantages (advantages.py): "grpo" | "dr_grpo" | "rloo"; eps is added to the group std by "grpo".
    advantage_estimator: str = "grpo"
    advantage_eps: float = 1e-6
    # Clipped surrogate (policy_loss.py): ratio clipped to [1 - clip_low, 1 + clip_high]; DAPO clip-higher 0.28.
    clip_low: float = 0.2
    clip_high: float = 0.28
    # Dual-clip bound c > 1 for negative advantages (Ye et al. 2020), or None.
    dual_clip: float | None = None
    # "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
    loss_agg_mode: str = "token-mean"
    # Dr. GRPO's constant normaliser (set it to the generation limit); None = padded length of each micro-batch.
    max_response_length_tokens: int | None = None
    # KL to a frozen reference policy (kl.py). kl_coef 0 loads no reference model.
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    # Entropy bonus: loss -= entropy_coef * aggregated entropy.
    entropy_coef: float = 0.0
    # DAPO overlong filtering: responses cut by the generation limit are left out of the loss.
    overlong_filtering: bool = False
    # Tree rollouts (tree.py): segment advantage formula and how shared prefixes are weighted across paths.
    tree_advantage_mode: str = "local"
    tree_std_normalize: bool = True
    tree_prefix_weighting: str = "once"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "grpo") -> None:
        """Raise one ``ValueError`` listing every bad value as ``<section>.<key>: problem``."""
        found = self.problems(section)
        if found:
            raise ValueError("; ".join(found))

    def problems(self, section: str = "grpo") -> list[str]:
        """Every bad value as ``<section>.<key>: problem`` (for a loader that reports all problems at once)."""
        from betterai_megatron.rl.advantages import ADVANTAGE_ESTIMATORS
        from betterai_megatron.rl.kl import KL_ESTIMATORS
        from betterai_megatron.rl.policy_loss import LOSS_AGGREGATIONS
        from betterai_megatron.rl.tree import PREFIX_WEIGHTINGS, TREE_ADVANTAGE_MODES

        found: list[str] = []

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                found.append(f"{section}.{key}: {message}")

        for key, registry in (
            ("advantage_estimator", ADVANTAGE_ESTIMATORS),
            ("loss_agg_mode", LOSS_AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
        ):
            value = getattr(self, key)
            check(value in registry, key, registry.unknown_name_message(value))
        for key, valid in (("tree_advantage_mode", TREE_ADVANTAGE_MODES), ("tree_prefix_weighting", PREFIX_WEIGHTINGS)):
            value = getattr(self, key)
            check(value in valid, key, f"unknown value {value!r}; valid values: {', '.join(map(repr, valid))}")
        check(0.0 <= self.clip_low < 1.0, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        check(self.clip_high >= 0.0, "clip_high", f"must be >= 0, got {self.clip_high}")
        check(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        check(self.advantage_eps >= 0.0, "advantage_eps", f"must be >= 0, got {self.advantage_eps}")
        length = self.max_response_length_tokens
        check(length is None or length > 0, "max_response_length_tokens", f"must be positive or null, got {length}")
        check(self.kl_coef >= 0.0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(
            self.kl_clamp is None or self.kl_clamp > 0.0, "kl_clamp", f"must be positive or null, got {self.kl_clamp}"
        )
        check(self.entropy_coef >= 0.0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        return found

    @property
    def needs_reference_model(self) -> bool:
        """Whether the trainer must load a frozen reference policy (only when the KL term is on)."""
        return self.kl_coef > 0.0
