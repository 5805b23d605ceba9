"""Pass-rate curriculum: choose which problems to roll out next from their running pass rates.

Sampling weights (registered by name in ``CURRICULUM_WEIGHTS``; ``p`` is a problem's running pass rate from
:class:`~betterai_megatron.rewards.difficulty.PassRateTracker`):

``"uniform"``        1 -- no curriculum.
``"learnability"``   ``p (1 - p)``, the variance of a Bernoulli reward: the expected size of a GRPO learning signal,
                     zero for problems always or never solved (Foster & Foerster 2025, "Learning to Reason at the
                     Frontier of Learnability", arXiv:2502.12272).
``"target"``         ``exp(-(p - target)^2 / (2 width^2))``: prefer problems solved about ``target`` of the time.

Every weight is floored at ``min_weight`` so no problem starves and estimates keep updating. Optionally, levels are
unlocked one at a time (``unlock_pass_rate``): only problems up to the current level are eligible, and the next
level opens when the mean pass rate of the current one reaches the threshold -- the "start easy" schedule that lets
a tiny model pick up the formulaic level-1 tasks first. Problems with level 0 (unknown) are always eligible.

Sampling is without replacement within a call (Efraimidis & Spirakis 2006 weighted keys ``u^(1/w)``), from a
seeded :class:`random.Random`, so a run is reproducible and its state can be checkpointed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from betterai_megatron.rewards.difficulty import PassRateTracker
from betterai_megatron.rewards.registry import Registry

CurriculumWeight = Callable[..., float]
CURRICULUM_WEIGHTS: Registry[CurriculumWeight] = Registry("curriculum weighting")


@CURRICULUM_WEIGHTS.register("uniform")
def uniform_weight(pass_rate: float, **_: float) -> float:
    return 1.0


@CURRICULUM_WEIGHTS.register("learnability")
def learnability_weight(pass_rate: float, **_: float) -> float:
    return pass_rate * (1.0 - pass_rate)


@CURRICULUM_WEIGHTS.register("target")
def target_weight(pass_rate: float, *, target: float = 0.5, width: float = 0.2, **_: float) -> float:
    return math.exp(-((pass_rate - target) ** 2) / (2.0 * width * width))


def weighted_sample_without_replacement(weights: Sequence[float], count: int, rng: random.Random) -> list[int]:
    """``count`` distinct indices, index ``i`` drawn with probability proportional to ``weights[i]`` at each step."""
    if count > len(weights):
        raise ValueError(f"cannot draw {count} distinct items from {len(weights)}")
    keys = []
    for index, weight in enumerate(weights):
        if weight <= 0:
            raise ValueError(f"weights must be positive, got {weight} at {index}")
        keys.append((rng.random() ** (1.0 / weight), index))
    keys.sort(reverse=True)
    return [index for _, index in keys[:count]]


class PassRateCurriculumSampler:
    """Draws batches of problems, weighted by their running pass rates (see the module docstring)."""

    def __init__(self, problems: Sequence, tracker: PassRateTracker, *, weighting: str = "learnability",
                 min_weight: float = 0.02, target: float = 0.5, width: float = 0.2,
                 unlock_pass_rate: float | None = None, seed: int = 0) -> None:
        if not problems:
            raise ValueError("the curriculum needs at least one problem")
        if min_weight <= 0:
            raise ValueError(f"min_weight must be > 0, got {min_weight}")
        self.problems = list(problems)
        self.tracker = tracker
        tracker.register_problems(self.problems)
        self.weight_fn = CURRICULUM_WEIGHTS.get(weighting)
        self.weighting = weighting
        self.min_weight = min_weight
        self.target, self.width = target, width
        self.unlock_pass_rate = unlock_pass_rate
        self.levels = sorted({p.level for p in self.problems if p.level > 0})
        self.unlocked_level = self.levels[0] if self.levels else 0
        self.rng = random.Random(seed)

    def weight(self, problem) -> float:
        rate = self.tracker.pass_rate(problem.task_id)
        return max(self.min_weight, self.weight_fn(rate, target=self.target, width=self.width))

    def level_pass_rate(self, level: int) -> float:
        rates = [self.tracker.pass_rate(p.task_id) for p in self.problems if p.level == level]
        return sum(rates) / len(rates) if rates else 0.0

    def _update_unlocked_level(self) -> None:
        if self.unlock_pass_rate is None:
            return
        while (self.unlocked_level != self.levels[-1]
               and self.level_pass_rate(self.unlocked_level) >= self.unlock_pass_rate):
            self.unlocked_level = self.levels[self.levels.index(self.unlocked_level) + 1]

    def eligible(self) -> list:
        self._update_unlocked_level()
        if self.unlock_pass_rate is None or not self.levels:
            return self.problems
        return [p for p in self.problems if p.level == 0 or p.level <= self.unlocked_level]

    def sample(self, count: int) -> list:
        """``count`` problems; distinct while ``count`` <= the eligible problems, else repeating whole rounds."""
        pool = self.eligible()
        chosen = []
        while len(chosen) < count:
            take = min(count - len(chosen), len(pool))
            weights = [self.weight(problem) for problem in pool]
            chosen.extend(pool[i] for i in weighted_sample_without_replacement(weights, take, self.rng))
        return chosen

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "unlocked_level": self.unlocked_level}

    def load_state_dict(self, state: dict) -> None:
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.unlocked_level = state["unlocked_level"]
