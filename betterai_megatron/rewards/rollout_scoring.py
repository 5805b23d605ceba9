"""Score rollouts: response text -> code -> sandboxed tests -> reward, plus the difficulty-aware advantage step.

The glue between the RL loop and the pure pieces, driven by :class:`~.rewards_config.RewardsConfig`::

    scorer = RolloutScorer(rewards_config, executor)
    scored = scorer.score(problems, responses, response_lengths)   # one ScoredResponse per response
    rewards = torch.tensor([s.reward for s in scored])
    keep = scorer.group_filter(rewards_for_filter, group_index)     # DAPO dynamic sampling
    advantages = scorer.weight_advantages(advantages, ...)          # GRPO-LEAD

``reward = test_reward + format_weight * format_reward + length_penalty``. A response with no code to extract
gets the ``no_verdict`` status (reward 0 from the tests).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from betterai_megatron.rewards.difficulty import PassRateTracker
from betterai_megatron.rewards.difficulty_weighting import ADVANTAGE_WEIGHTINGS, group_pass_rates
from betterai_megatron.rewards.dynamic_sampling import GROUP_FILTERS
from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.format_reward import extract_code, format_reward
from betterai_megatron.rewards.overlong_penalty import LENGTH_PENALTIES
from betterai_megatron.rewards.rewards_config import RewardsConfig
from betterai_megatron.rewards.test_reward import TEST_REWARDS
from betterai_megatron.rewards.verdict import Verdict


@dataclass
class ScoredResponse:
    reward: float
    test_reward: float
    format_reward: float
    length_penalty: float
    verdict: Verdict
    code: str | None


class RolloutScorer:
    def __init__(self, config: RewardsConfig, executor: CodeExecutor) -> None:
        config.validate()
        self.config = config
        self.executor = executor

    def score(self, problems: Sequence, responses: Sequence[str],
              response_lengths: Sequence[int] | torch.Tensor) -> list[ScoredResponse]:
        """Score ``responses[i]`` (``response_lengths[i]`` tokens) as an answer to ``problems[i]``."""
        if not len(problems) == len(responses) == len(response_lengths):
            raise ValueError(f"{len(problems)} problems, {len(responses)} responses, "
                             f"{len(response_lengths)} lengths: they must match")
        c = self.config
        codes = [extract_code(text, language=problem.language, mode=c.code_extraction)
                 for problem, text in zip(problems, responses)]
        futures = {i: self.executor.submit(self.executor.job_for(problem, code, mode=c.test_mode))
                   for i, (problem, code) in enumerate(zip(problems, codes)) if code is not None}
        lengths = torch.as_tensor(response_lengths)
        penalties = LENGTH_PENALTIES.get(c.length_penalty)(
            lengths, max_length=c.overlong_max_tokens, cache_length=c.overlong_cache_tokens).tolist()
        test_reward_fn = TEST_REWARDS.get(c.test_reward)
        scored = []
        for i, (problem, text) in enumerate(zip(problems, responses)):
            if i in futures:
                verdict = futures[i].result()
            else:
                verdict = Verdict(status="no_verdict", tests_total=1, per_test=[False], error="no code found")
            test_reward = test_reward_fn(verdict, error_reward=c.error_reward)
            fmt = format_reward(text) if c.format_weight else 0.0
            reward = test_reward + c.format_weight * fmt + penalties[i]
            scored.append(ScoredResponse(reward=reward, test_reward=test_reward, format_reward=fmt,
                                         length_penalty=penalties[i], verdict=verdict, code=codes[i]))
        return scored

    def group_filter(self, rewards: torch.Tensor, group_index: torch.Tensor | Sequence[Hashable]) -> torch.Tensor:
        """``[n]`` bool: the samples of groups worth training on (``rewards.group_filter``)."""
        return GROUP_FILTERS.get(self.config.group_filter)(rewards, group_index)

    def update_tracker(self, tracker: PassRateTracker, task_ids: Sequence[str], test_rewards: torch.Tensor) -> None:
        """Add this batch's outcomes to the running pass rates (one update per task, all its samples)."""
        totals: dict[str, list[float]] = {}
        for task_id, reward in zip(task_ids, test_rewards.tolist()):
            passed = 1.0 if reward >= self.config.success_threshold else 0.0
            entry = totals.setdefault(task_id, [0.0, 0.0])
            entry[0] += passed
            entry[1] += 1.0
        for task_id, (num_passed, num_samples) in totals.items():
            tracker.observe(task_id, num_passed=num_passed, num_samples=num_samples)

    def weight_advantages(self, advantages: torch.Tensor, *, test_rewards: torch.Tensor,
                          group_index: torch.Tensor | Sequence[Hashable], task_ids: Sequence[str] | None = None,
                          tracker: PassRateTracker | None = None) -> torch.Tensor:
        """``[n]`` advantages reweighted by difficulty (``rewards.advantage_weighting``)."""
        c = self.config
        if c.advantage_weighting == "none":
            return advantages
        if c.grpo_lead.pass_rate_source == "running":
            if tracker is None or task_ids is None:
                raise ValueError("rewards.grpo_lead.pass_rate_source=running needs task_ids and a tracker")
            pass_rates = torch.tensor([tracker.pass_rate(t) for t in task_ids], dtype=advantages.dtype)
        else:
            pass_rates = group_pass_rates(test_rewards, group_index, success_threshold=c.success_threshold)
        g = c.grpo_lead
        return ADVANTAGE_WEIGHTINGS.get(c.advantage_weighting)(
            advantages, pass_rates.to(advantages.dtype), min_weight=g.min_weight, max_weight=g.max_weight,
            midpoint=g.midpoint, steepness=g.steepness)
