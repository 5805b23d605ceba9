"""Rollout scoring end to end: responses -> code -> sandbox -> rewards, filters and difficulty weights."""

from __future__ import annotations

import pytest
import torch

from betterai_megatron.data.problems.generator import generate_problems
from betterai_megatron.rewards.difficulty import PassRateTracker
from betterai_megatron.rewards.rewards_config import RewardsConfig
from betterai_megatron.rewards.rollout_scoring import RolloutScorer


@pytest.fixture(scope="module")
def add_problem():
    problem = next(p for p in generate_problems(seed=0, levels=[1]) if p.entry_point == "add_3")
    return problem


def test_scores_combine_tests_format_and_length(executor, add_problem):
    config = RewardsConfig(test_reward="fraction", test_mode="auto", format_weight=0.5,
                           length_penalty="dapo_overlong", overlong_max_tokens=100, overlong_cache_tokens=20)
    scorer = RolloutScorer(config, executor)
    good = "<think>add three</think>\n```python\ndef add_3(x):\n    return x + 3\n```"
    half = "```python\ndef add_3(x):\n    return x + 3 if x < 0 else x + 4\n```"  # no <think>: format 0
    continuation = "    return x + 3\n"  # a completion-style model continuing the prompt
    broken = "<think>t</think>\n```python\ndef add_3(x) return\n```"
    scored = scorer.score([add_problem] * 4, [good, half, continuation, broken], [10, 90, 10, 10])
    rewards = [s.reward for s in scored]
    tests_negative = sum(1 for case in add_problem.test_cases if "candidate(-" in case)
    expected_half = tests_negative / len(add_problem.test_cases)
    assert scored[0].verdict.status == "passed" and rewards[0] == pytest.approx(1.0 + 0.5 * 1.0)
    assert scored[1].test_reward == pytest.approx(expected_half) and scored[1].format_reward == 0.0
    assert scored[1].length_penalty == pytest.approx((80 - 90) / 20)
    assert rewards[2] == pytest.approx(1.0)
    assert scored[3].verdict.status == "syntax_error" and scored[3].test_reward == 0.0
    assert scored[3].format_reward == 1.0


def test_filter_tracker_and_difficulty_weights(executor, add_problem):
    config = RewardsConfig(test_reward="binary", group_filter="dapo", advantage_weighting="grpo_lead")
    scorer = RolloutScorer(config, executor)
    right, wrong = "    return x + 3\n", "    return x - 3\n"
    responses = [right, wrong, right, right, wrong, wrong]
    scored = scorer.score([add_problem] * 6, responses, [5] * 6)
    test_rewards = torch.tensor([s.test_reward for s in scored])
    assert test_rewards.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    groups = [0, 0, 1, 1, 2, 2]  # group 0 mixed, group 1 all right, group 2 all wrong
    assert scorer.group_filter(test_rewards, groups).tolist() == [True, True, False, False, False, False]
    tracker = PassRateTracker(prior_strength=0.0)
    scorer.update_tracker(tracker, [add_problem.task_id] * 6, test_rewards)
    assert tracker.pass_rate(add_problem.task_id) == pytest.approx(0.5)
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    weighted = scorer.weight_advantages(advantages, test_rewards=test_rewards, group_index=groups)
    w = lambda rho: 0.4 + 1.1 / (1 + torch.exp(torch.tensor(10 * (rho - 0.75))))
    assert weighted[:2].tolist() == pytest.approx([float(w(0.5)), -float(w(0.5))])
