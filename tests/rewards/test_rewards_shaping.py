"""Reward functions and shaping, against hand-computed values and naive re-implementations written here."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from betterai_megatron.data.problems import Problem
from betterai_megatron.rewards.curriculum import (
    CURRICULUM_WEIGHTS,
    PassRateCurriculumSampler,
    weighted_sample_without_replacement,
)
from betterai_megatron.rewards.difficulty import PassRateTracker, prior_pass_rate
from betterai_megatron.rewards.difficulty_weighting import ADVANTAGE_WEIGHTINGS, group_pass_rates
from betterai_megatron.rewards.dynamic_sampling import GROUP_FILTERS
from betterai_megatron.rewards.format_reward import extract_code, format_reward
from betterai_megatron.rewards.overlong_penalty import LENGTH_PENALTIES
from betterai_megatron.rewards.rewards_config import RewardsConfig
from betterai_megatron.rewards.test_reward import TEST_REWARDS
from betterai_megatron.rewards.verdict import Verdict


# ------------------------------------------------------------------------------------------------ test rewards
def test_binary_and_fraction_test_rewards():
    binary, fraction = TEST_REWARDS.get("binary"), TEST_REWARDS.get("fraction")
    partial = Verdict(status="failed", tests_passed=3, tests_total=4)
    assert binary(Verdict(status="passed", tests_passed=4, tests_total=4)) == 1.0
    assert binary(partial) == 0.0 and fraction(partial) == 0.75
    assert binary(Verdict(status="timeout"), error_reward=-1.0) == 0.0  # ran, too slow: a failure, not an error
    for status in ("syntax_error", "compile_error"):
        assert fraction(Verdict(status=status, tests_total=4), error_reward=-0.5) == -0.5
    with pytest.raises(ValueError, match="did you mean 'fraction'"):
        TEST_REWARDS.get("fractoin")


# ------------------------------------------------------------------------------------------------ format reward
GOOD = "<think>\nadd three\n</think>\n```python\ndef add_3(x):\n    return x + 3\n```\n"


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("  " + GOOD + "\n\n", 1.0),
    ("```python\ndef f():\n    pass\n```", 0.0),  # no reasoning
    ("<think>x</think>\nno code here", 0.0),
    ("<think>x</think>```python\na\n```\n```python\nb\n```", 0.0),  # two blocks
    ("<think>x</think>```python\na\n``` and then some prose", 0.0),  # text after the block
    ("<think><think>x</think></think>```python\na\n```", 0.0),  # nested tags
    ("intro <think>x</think>```python\na\n```", 0.0),  # text before the reasoning
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_extract_code():
    assert extract_code(GOOD, language="python") == "def add_3(x):\n    return x + 3\n"
    two = "```js\nconsole.log(1)\n```\ntext\n```python\nx = 1\n```\n```python\nx = 2\n```"
    assert extract_code(two, language="python") == "x = 2\n"  # last block of the right language
    assert extract_code(two, language="javascript") == "console.log(1)\n"
    assert extract_code("    return x + 3\n", mode="auto") == "    return x + 3\n"  # a continuation
    assert extract_code("<think>hmm</think>\n    return 1\n", mode="auto") == "    return 1\n"
    assert extract_code("no fences", mode="fenced") is None
    assert extract_code(GOOD, mode="raw") == GOOD


# ------------------------------------------------------------------------------------------------ difficulty
def test_pass_rate_tracker_is_a_beta_posterior():
    tracker = PassRateTracker(prior_strength=4.0)
    tracker.register("easy", level=1)
    tracker.register("hard", difficulty="hard")
    assert tracker.pass_rate("easy") == pytest.approx(0.9) and tracker.pass_rate("hard") == pytest.approx(0.15)
    tracker.observe("easy", num_passed=2, num_samples=8)
    assert tracker.pass_rate("easy") == pytest.approx((0.9 * 4 + 2) / (4 + 8))
    assert tracker.difficulty("easy") == pytest.approx(1 - (0.9 * 4 + 2) / 12)
    decaying = PassRateTracker(prior_strength=2.0, decay=0.5)
    decaying.observe("t", num_passed=4, num_samples=4)
    decaying.observe("t", num_passed=0, num_samples=4)  # passes 4 -> 2, failures 0 -> 0 + 4
    assert decaying.pass_rate("t") == pytest.approx((0.5 * 2 + 2) / (2 + 2 + 4))
    restored = PassRateTracker()
    restored.load_state_dict(decaying.state_dict())
    assert restored.pass_rate("t") == decaying.pass_rate("t")
    assert prior_pass_rate(difficulty="medium") == 0.4 and prior_pass_rate(level=5) == 0.1


def _lead_weight(rho: float) -> float:  # the paper's formula, written out
    return 0.4 + (1.5 - 0.4) / (1.0 + math.exp(10.0 * (rho - 0.75)))


def test_grpo_lead_weighting_matches_the_formula():
    weighting = ADVANTAGE_WEIGHTINGS.get("grpo_lead")
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    rho = torch.tensor([0.25, 0.25, 0.9, 0.9, 0.5], dtype=torch.float64)
    expected = [1.0 * _lead_weight(0.25), -1.0 * _lead_weight(0.75), 0.5 * _lead_weight(0.9),
                -0.5 * _lead_weight(0.1), 0.0]
    assert weighting(advantages, rho).tolist() == pytest.approx(expected)
    assert _lead_weight(0.75) == pytest.approx(0.95)
    # A correct answer on a hard problem outweighs one on an easy problem; failing an easy one costs more.
    assert expected[0] > expected[2] and abs(expected[3]) > 0.5 * _lead_weight(0.9)
    assert ADVANTAGE_WEIGHTINGS.get("none")(advantages, rho) is advantages


def test_group_pass_rates():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    rates = group_pass_rates(rewards, ["a", "a", "b", "b", "c", "c"])
    assert rates.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.0, 0.0])


def test_dapo_filter_drops_groups_that_all_pass_or_all_fail():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.3, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    keep = GROUP_FILTERS.get("dapo")(rewards, groups)
    assert keep.tolist() == [False] * 6 + [True, True] + [False, False]
    assert GROUP_FILTERS.get("none")(rewards, groups).all()


def test_dapo_overlong_penalty_matches_the_piecewise_formula():
    lengths = torch.tensor([50, 80, 81, 90, 100, 101, 500])
    penalty = LENGTH_PENALTIES.get("dapo_overlong")(lengths, max_length=100, cache_length=20)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0])
    assert LENGTH_PENALTIES.get("none")(lengths).tolist() == [0.0] * 7
    with pytest.raises(ValueError):
        LENGTH_PENALTIES.get("dapo_overlong")(lengths, max_length=100, cache_length=0)


# ------------------------------------------------------------------------------------------------ curriculum
def _problem(task_id: str, level: int) -> Problem:
    return Problem(task_id=task_id, prompt="", tests="", entry_point="f", level=level)


def test_weighted_sampling_without_replacement():
    rng = random.Random(0)
    picks = weighted_sample_without_replacement([1.0, 2.0, 3.0], 3, rng)
    assert sorted(picks) == [0, 1, 2]
    # First draw frequencies follow the weights (Efraimidis-Spirakis): P(i first) = w_i / sum(w).
    firsts = Counter(weighted_sample_without_replacement([1.0, 3.0], 1, rng)[0] for _ in range(4000))
    assert firsts[1] / 4000 == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError):
        weighted_sample_without_replacement([1.0], 2, rng)


def test_learnability_curriculum_prefers_problems_at_the_frontier():
    assert CURRICULUM_WEIGHTS.get("learnability")(0.5) == 0.25
    assert CURRICULUM_WEIGHTS.get("target")(0.7, target=0.7) == 1.0
    tracker = PassRateTracker(prior_strength=0.0)
    problems = [_problem("frontier", 1), _problem("solved", 1)]
    tracker.register_problems(problems)
    tracker.observe("frontier", num_passed=5, num_samples=10)
    tracker.observe("solved", num_passed=10, num_samples=10)
    sampler = PassRateCurriculumSampler(problems, tracker, weighting="learnability", min_weight=0.02, seed=1)
    firsts = Counter(sampler.sample(1)[0].task_id for _ in range(3000))
    assert firsts["frontier"] / 3000 == pytest.approx(0.25 / 0.27, abs=0.03)  # floor keeps "solved" alive
    again = PassRateCurriculumSampler(problems, tracker, weighting="learnability", seed=1)
    assert [p.task_id for p in again.sample(2)] == [p.task_id for p in
                                                      PassRateCurriculumSampler(problems, tracker, seed=1,
                                                                                weighting="learnability").sample(2)]


def test_curriculum_unlocks_levels_as_they_are_learned():
    problems = [_problem(f"l{level}-{i}", level) for level in (1, 2, 3) for i in range(3)]
    tracker = PassRateTracker(prior_strength=1.0)
    sampler = PassRateCurriculumSampler(problems, tracker, weighting="uniform", unlock_pass_rate=0.95, seed=0)
    assert {p.level for p in sampler.sample(9)} == {1}  # level 1's prior (0.9) is below the threshold
    for i in range(3):
        tracker.observe(f"l1-{i}", num_passed=20, num_samples=20)  # (0.9 + 20) / 21 = 0.995 >= 0.95
    assert {p.level for p in sampler.sample(9)} == {1, 2}  # level 2 opens; its prior 0.7 keeps level 3 shut
    for i in range(3):
        tracker.observe(f"l2-{i}", num_passed=20, num_samples=20)
    assert {p.level for p in sampler.sample(9)} == {1, 2, 3}
    state = sampler.state_dict()
    draws = [p.task_id for p in sampler.sample(5)]
    sampler.load_state_dict(state)
    assert [p.task_id for p in sampler.sample(5)] == draws


def test_rewards_config_validation():
    RewardsConfig(test_reward="fraction", advantage_weighting="grpo_lead", group_filter="dapo",
                  length_penalty="dapo_overlong").validate()
    for kwargs, message in (({"group_filter": "dapoo"}, "rewards.group_filter.*did you mean 'dapo'"),
                            ({"test_reward": "fraction", "test_mode": "check"}, "rewards.test_reward=fraction"),
                            ({"overlong_cache_tokens": 0}, "rewards.overlong_cache_tokens")):
        with pytest.raises(ValueError, match=message):
            RewardsConfig(**kwargs).validate()
