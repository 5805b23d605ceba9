"""A problem's difficulty, from its label and from its running pass rate (updated as rollouts come in).

Two sources, combined as a Beta posterior per problem:

* the **prior** from the problem's label or numeric level (:func:`prior_pass_rate`): level 1 is expected to be
  solved 90 % of the time, level 5 10 %; ``easy``/``medium``/``hard`` map to 70/40/15 %; unknown is 50 %;
* the **evidence**: every group of rollouts adds its passes and failures (a fraction-passed reward may add
  fractional passes).

``pass_rate = (prior * strength + passes) / (strength + passes + failures)`` -- the posterior mean of
``Beta(prior * strength, (1 - prior) * strength)`` -- and ``difficulty = 1 - pass_rate``. With ``decay < 1`` old
evidence fades (counts are multiplied by ``decay`` before each update), so the estimate follows a policy that is
getting better instead of averaging over its whole history. :class:`PassRateTracker` keeps this per task and can
be saved with the checkpoint (``state_dict``). Hand-written: a dozen lines of counting.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVEL_PRIOR_PASS_RATE = {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.3, 5: 0.1}
LABEL_PRIOR_PASS_RATE = {"easy": 0.7, "medium": 0.4, "hard": 0.15}
UNKNOWN_PRIOR_PASS_RATE = 0.5


def prior_pass_rate(*, difficulty: str = "unknown", level: int = 0) -> float:
    """Expected pass rate before any rollout: from ``level`` (1..5) when known, else from the label."""
    if level in LEVEL_PRIOR_PASS_RATE:
        return LEVEL_PRIOR_PASS_RATE[level]
    return LABEL_PRIOR_PASS_RATE.get(str(difficulty).lower(), UNKNOWN_PRIOR_PASS_RATE)


def beta_posterior_mean(*, prior: float, strength: float, passes: float, failures: float) -> float:
    """Posterior mean pass rate: ``(prior * strength + passes) / (strength + passes + failures)``."""
    total = strength + passes + failures
    if total <= 0:
        return prior
    return (prior * strength + passes) / total


@dataclass
class _TaskCounts:
    prior: float
    passes: float = 0.0
    failures: float = 0.0


class PassRateTracker:
    """Running pass-rate (and difficulty) estimate per task id."""

    def __init__(self, *, prior_strength: float = 4.0, decay: float = 1.0) -> None:
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.prior_strength = prior_strength
        self.decay = decay
        self._tasks: dict[str, _TaskCounts] = {}

    def register(self, task_id: str, *, difficulty: str = "unknown", level: int = 0) -> None:
        """Set the prior of ``task_id`` from its label/level (kept if the task is already known)."""
        if task_id not in self._tasks:
            self._tasks[task_id] = _TaskCounts(prior=prior_pass_rate(difficulty=difficulty, level=level))

    def register_problems(self, problems) -> None:
        for problem in problems:
            self.register(problem.task_id, difficulty=problem.difficulty, level=problem.level)

    def observe(self, task_id: str, *, num_passed: float, num_samples: float) -> None:
        """Add one group of rollouts: ``num_passed`` successes (may be fractional) out of ``num_samples``."""
        if not 0 <= num_passed <= num_samples:
            raise ValueError(f"num_passed must be in [0, num_samples={num_samples}], got {num_passed}")
        counts = self._tasks.setdefault(task_id, _TaskCounts(prior=UNKNOWN_PRIOR_PASS_RATE))
        counts.passes = counts.passes * self.decay + num_passed
        counts.failures = counts.failures * self.decay + (num_samples - num_passed)

    def pass_rate(self, task_id: str) -> float:
        counts = self._tasks.get(task_id)
        if counts is None:
            return UNKNOWN_PRIOR_PASS_RATE
        return beta_posterior_mean(prior=counts.prior, strength=self.prior_strength, passes=counts.passes,
                                   failures=counts.failures)

    def difficulty(self, task_id: str) -> float:
        """``1 - pass_rate``: 0 for a problem that is always solved, 1 for one never solved."""
        return 1.0 - self.pass_rate(task_id)

    def num_observed(self, task_id: str) -> float:
        counts = self._tasks.get(task_id)
        return 0.0 if counts is None else counts.passes + counts.failures

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks

    def state_dict(self) -> dict:
        return {"prior_strength": self.prior_strength, "decay": self.decay,
                "tasks": {tid: [c.prior, c.passes, c.failures] for tid, c in self._tasks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prior_strength = float(state["prior_strength"])
        self.decay = float(state["decay"])
        self._tasks = {tid: _TaskCounts(prior=float(v[0]), passes=float(v[1]), failures=float(v[2]))
                       for tid, v in state["tasks"].items()}
