"""Test-based rewards: a :class:`~betterai_megatron.rewards.verdict.Verdict` becomes a scalar (registered by name).

``"binary"``    1.0 when every test passed, else 0.0 -- the verifiable reward of DeepSeek-R1 (Guo et al. 2025) and
                of code RL generally (CodeRL, Le et al. 2022, uses pass/fail outcomes as its basic signal).
``"fraction"``  the fraction of test cases passed (partial credit, as in "unit-test pass rate" rewards; denser
                than binary when most samples fail). Needs problems with ``test_cases`` run in case mode; a
                check-mode verdict counts as one test.

A program that does not even run (``syntax_error``, ``compile_error``) gets ``error_reward`` (default 0.0; a
negative value penalises broken code below wrong code, as CodeRL's -1 for compile errors). ``timeout``,
``memory_limit``, ``output_limit`` and ``no_verdict`` count as failures. A ``sandbox_error`` is an infrastructure
fault, not the model's: :func:`is_infrastructure_failure` lets the trainer drop such samples rather than
punish them.
"""

from __future__ import annotations

from collections.abc import Callable

from betterai_megatron.rewards.registry import Registry
from betterai_megatron.rewards.verdict import Verdict

TestReward = Callable[..., float]
TEST_REWARDS: Registry[TestReward] = Registry("test reward")
DOES_NOT_RUN = frozenset({"syntax_error", "compile_error"})


def is_infrastructure_failure(verdict: Verdict) -> bool:
    return verdict.status == "sandbox_error"


@TEST_REWARDS.register("binary")
def binary_test_reward(verdict: Verdict, *, error_reward: float = 0.0) -> float:
    """1.0 if all tests passed; ``error_reward`` if the program does not parse/compile; else 0.0."""
    if verdict.status in DOES_NOT_RUN:
        return error_reward
    return 1.0 if verdict.passed else 0.0


@TEST_REWARDS.register("fraction")
def fraction_test_reward(verdict: Verdict, *, error_reward: float = 0.0) -> float:
    """``tests_passed / tests_total``; ``error_reward`` if the program does not parse/compile."""
    if verdict.status in DOES_NOT_RUN:
        return error_reward
    if verdict.tests_total <= 0:
        return 0.0
    return verdict.tests_passed / verdict.tests_total
