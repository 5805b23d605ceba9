"""GRPO orchestration without a model: dynamic sampling with refill, group advantages (linear and tree), branch
points of tree rollouts, mini-batch building, and the rollout config's errors. References are hand-computed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from betterai_megatron.config import ConfigError, load_config
from betterai_megatron.data.problems import Problem
from betterai_megatron.rewards.rewards_config import RewardsConfig
from betterai_megatron.rewards.rollout_scoring import RolloutScorer, ScoredResponse
from betterai_megatron.rewards.verdict import Verdict
from betterai_megatron.rl.algo_config import GRPOLossConfig
from betterai_megatron.rl.policy_update import (
    UpdatePlan,
    build_mini_batches,
    collate_micro_batch,
)
from betterai_megatron.rl.rollout import (
    RolloutGroup,
    Trajectory,
    assign_advantages,
    collect_groups,
    group_filter_predicate,
    refill_size,
)
from betterai_megatron.rl.tree import TrajectoryTree
from betterai_megatron.rl.tree_rollout import branch_offsets, quantized_budget

REPO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_grpo.yaml"
PROBLEM = Problem(task_id="t/0", prompt="def f(x):\n", tests="def check(candidate):\n    pass\n", entry_point="f",
                  level=1)


def make_group(group_id: int, rewards, *, round_index: int = 0, response_lengths=None) -> RolloutGroup:
    """A linear group whose trajectories carry the given rewards (test reward = reward)."""
    tree = TrajectoryTree.with_prompt([1, 2, 3])
    trajectories = []
    for index, reward in enumerate(rewards):
        length = response_lengths[index] if response_lengths else 2 + index
        tokens = [100 * group_id + 10 + index] * length  # unique per trajectory
        leaf = tree.add_segment(0, tokens)
        verdict = Verdict(status="passed" if reward >= 1 else "failed", tests_passed=int(reward >= 1))
        trajectory = Trajectory(problem=PROBLEM, group_id=group_id, leaf=leaf, prompt_token_ids=[1, 2, 3],
                                response_token_ids=tokens, finish_reason="stop", reward=float(reward))
        trajectory.scored = ScoredResponse(reward=float(reward), test_reward=float(reward), format_reward=0.0,
                                           length_penalty=0.0, verdict=verdict, code="")
        trajectories.append(trajectory)
    return RolloutGroup(problem=PROBLEM, group_id=group_id, round_index=round_index, tree=tree,
                        trajectories=trajectories)


def dapo_scorer(**changes) -> RolloutScorer:
    # the group filter and the advantage weighting need only the config, not the sandbox
    return RolloutScorer(RewardsConfig(group_filter="dapo", **changes), executor=None)


# ----------------------------------------------------------------------------------------------- dynamic sampling

SCRIPT = [  # rewards of the groups each round returns, in order
    [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]],  # round 0: one group has spread
    [[0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]],  # refill: one more
    [[1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 1], [0, 1, 0, 0]],  # refill: all four pass the filter
]


def scripted_rounds(script):
    requests = []
    next_id = [0]

    def sample_round(round_index, count):
        requests.append((round_index, count))
        groups = []
        for rewards in script[round_index][:count]:
            groups.append(make_group(next_id[0], rewards, round_index=round_index))
            next_id[0] += 1
        return groups

    return sample_round, requests


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    sample_round, requests = scripted_rounds(SCRIPT)
    collected = collect_groups(sample_round=sample_round, keep_group=group_filter_predicate(dapo_scorer()),
                               prompts_per_step=4, max_refill_rounds=2, refill=True)
    # round 0 asks for 4; 1 of 4 kept -> keep rate 1/4 -> ceil(3 / 0.25) = 12, capped at 4 problems;
    # round 1: 1 more kept (2 of 7 so far) -> ceil(2 / (2/7)) = 7, capped at 4.
    assert requests == [(0, 4), (1, 4), (2, 4)]
    kept_rewards = [g.rewards.tolist() for g in collected.kept]
    assert kept_rewards == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    assert collected.rounds == 3
    assert len(collected.generated) == 11
    assert collected.passed_filter == 6  # two passing groups of the last round are surplus
    assert collected.kept_group_fraction == pytest.approx(6 / 11)
    flags = [g.kept for g in collected.generated]
    assert flags == [False, False, True, False, False, True, False, True, True, False, False]


def test_dynamic_sampling_without_refill_keeps_one_round():
    sample_round, requests = scripted_rounds(SCRIPT)
    collected = collect_groups(sample_round=sample_round, keep_group=group_filter_predicate(dapo_scorer()),
                               prompts_per_step=4, max_refill_rounds=2, refill=False)
    assert requests == [(0, 4)]
    assert [g.rewards.tolist() for g in collected.kept] == [[1, 0, 0, 0]]
    assert collected.kept_group_fraction == pytest.approx(1 / 4)


def test_dynamic_sampling_gives_up_after_max_refill_rounds():
    sample_round, requests = scripted_rounds([[[1, 1]], [[0, 0]], [[1, 0]]])
    collected = collect_groups(sample_round=sample_round, keep_group=group_filter_predicate(dapo_scorer()),
                               prompts_per_step=1, max_refill_rounds=1, refill=True)
    assert [r for r, _ in requests] == [0, 1]
    assert collected.kept == []


def test_refill_size_scales_by_keep_rate():
    assert refill_size(missing=2, passed=2, generated=4, prompts_per_step=8) == 4  # keep rate 1/2
    assert refill_size(missing=3, passed=0, generated=8, prompts_per_step=8) == 8  # floored at 1/4, capped
    assert refill_size(missing=1, passed=3, generated=3, prompts_per_step=8) == 1


# ----------------------------------------------------------------------------------------------- advantages

def test_linear_advantages_are_grpo_by_hand():
    groups = [make_group(0, [1, 0, 0, 1]), make_group(1, [1, 1, 1, 1]), make_group(2, [0.5, 0, 0, 0])]
    assign_advantages(groups, grpo=GRPOLossConfig(advantage_eps=0.0), scorer=dapo_scorer())
    std0 = math.sqrt(4 * 0.25 / 3)  # rewards 1,0,0,1: mean .5, unbiased std sqrt(1/3)
    std2 = math.sqrt((0.375 ** 2 + 3 * 0.125 ** 2) / 3)  # rewards .5,0,0,0: mean .125
    expected = [[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0, 0, 0, 0],
                [0.375 / std2, -0.125 / std2, -0.125 / std2, -0.125 / std2]]
    for group, values in zip(groups, expected):
        assert [t.advantage for t in group.trajectories] == pytest.approx(values)
        for trajectory, value in zip(group.trajectories, values):
            length = len(trajectory.response_token_ids)
            assert trajectory.token_advantages.tolist() == pytest.approx([value] * length)
            assert trajectory.token_weights.tolist() == [1.0] * length


def test_grpo_lead_weights_linear_advantages():
    group = make_group(0, [1, 0, 0, 0])
    scorer = dapo_scorer(advantage_weighting="grpo_lead")
    assign_advantages([group], grpo=GRPOLossConfig(advantage_eps=0.0), scorer=scorer)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)

    def weight(rho):  # GRPO-LEAD defaults A=.4, B=1.5, rho0=.75, k=10
        return 0.4 + 1.1 / (1 + math.exp(10 * (rho - 0.75)))

    expected = [0.75 / std * weight(0.25)] + [-0.25 / std * weight(0.75)] * 3
    assert [t.advantage for t in group.trajectories] == pytest.approx(expected)


def test_tree_group_advantages_by_hand():
    """root -> A -> (A1 r=1, A2 r=0); root -> B (r=0): V(A) = .5, V(root) = 1/3."""
    tree = TrajectoryTree.with_prompt([1, 2])
    a = tree.add_segment(0, [5, 6])
    a1, a2 = tree.add_segment(a, [7]), tree.add_segment(a, [8, 9])
    b = tree.add_segment(0, [10])
    trajectories = []
    for leaf, tokens, reward in ((a1, [5, 6, 7], 1.0), (a2, [5, 6, 8, 9], 0.0), (b, [10], 0.0)):
        t = Trajectory(problem=PROBLEM, group_id=0, leaf=leaf, prompt_token_ids=[1, 2], response_token_ids=tokens,
                       finish_reason="stop", reward=reward)
        t.scored = ScoredResponse(reward=reward, test_reward=reward, format_reward=0.0, length_penalty=0.0,
                                  verdict=Verdict(status="failed"), code="")
        trajectories.append(t)
    group = RolloutGroup(problem=PROBLEM, group_id=0, round_index=0, tree=tree, trajectories=trajectories)
    grpo = GRPOLossConfig(tree_advantage_mode="local", tree_std_normalize=False, tree_prefix_weighting="once")
    assign_advantages([group], grpo=grpo, scorer=dapo_scorer())
    adv_a = 0.5 - 1 / 3
    assert trajectories[0].token_advantages.tolist() == pytest.approx([adv_a, adv_a, 0.5])
    assert trajectories[1].token_advantages.tolist() == pytest.approx([adv_a, adv_a, -0.5, -0.5])
    assert trajectories[2].token_advantages.tolist() == pytest.approx([-1 / 3])
    # the shared prefix A is trained once, in the first path through it
    assert trajectories[0].token_weights.tolist() == [1, 1, 1]
    assert trajectories[1].token_weights.tolist() == [0, 0, 1, 1]
    assert [t.advantage for t in trajectories] == pytest.approx([0.5, -0.5, -1 / 3])


# ----------------------------------------------------------------------------------------------- tree branch points

def test_branch_offsets_after_reasoning_lines_only():
    newline = {2, 5}.__contains__  # tokens 2 and 5 hold a newline; 9 is </think>
    segment = [1, 2, 3, 5, 4, 9, 2, 1]
    offsets = branch_offsets(segment, tokens_before=0, max_new_tokens=100, min_continuation_tokens=4,
                             is_newline=newline, think_end_id=9, reasoning_closed=False)
    assert offsets == [2, 4]  # after tokens at 1 and 3; the newline after </think> (index 6) is not reasoning
    # the budget: at offset j, 10 - (3 + j) tokens remain; 4 are needed -> j <= 3
    assert branch_offsets(segment, tokens_before=3, max_new_tokens=10, min_continuation_tokens=4,
                          is_newline=newline, think_end_id=9, reasoning_closed=False) == [2]
    assert branch_offsets(segment, tokens_before=0, max_new_tokens=100, min_continuation_tokens=1,
                          is_newline=newline, think_end_id=9, reasoning_closed=True) == []


def test_quantized_budget():
    assert [quantized_budget(n) for n in (3, 8, 15, 16, 61)] == [3, 8, 8, 16, 56]


# ----------------------------------------------------------------------------------------------- mini-batches

def test_micro_batch_aligns_labels_weights_and_advantages():
    batch = collate_micro_batch([([1, 2, 3], [4, 5], torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.25])),
                                 ([7], [8, 9, 6], torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 0.0]))],
                                pad_token_id=0)
    assert batch["tokens"].shape == (2, 8)  # longest: 3 + 2 - 1 = 4, padded to a multiple of 8
    assert batch["tokens"][0, :4].tolist() == [1, 2, 3, 4]
    assert batch["labels"][0, :4].tolist() == [2, 3, 4, 5]
    assert batch["weights"][0].tolist() == [0, 0, 1, 0.25, 0, 0, 0, 0]  # labels 4 and 5 are the response
    assert batch["advantages"][0].tolist() == [0, 0, 0.5, -1, 0, 0, 0, 0]
    assert batch["labels"][1, :3].tolist() == [8, 9, 6]
    assert batch["weights"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["position_ids"][1].tolist() == list(range(8))


def test_mini_batches_cover_every_trajectory_once_across_dp_ranks():
    groups = [make_group(g, [1, 0, 1], response_lengths=[2 + g, 3, 4]) for g in range(3)]  # 9 trajectories
    assign_advantages(groups, grpo=GRPOLossConfig(), scorer=dapo_scorer())
    trajectories = [t for g in groups for t in g.trajectories]
    trajectories[4].finish_reason = "length"  # truncated: DAPO overlong filtering gives it weight 0
    trained = {}  # first response token -> (weight sum, number of rows)
    for dp_rank in range(2):
        plan = UpdatePlan(micro_batch_size=2, mini_batch_size_trajectories=5, epochs=1, dp_rank=dp_rank, dp_size=2,
                          shuffle=True, seed=3)
        mini_batches = build_mini_batches(trajectories, plan=plan, overlong_filtering=True)
        assert [m.num_trajectories for m in mini_batches] == [5, 4]
        # 5 trajectories over 2 ranks x 2 per micro-batch -> padded to 8: 2 micro-batches per rank, then 1
        assert [len(m.micro_batches) for m in mini_batches] == [2, 1]
        expected_tokens = sum(len(t.response_token_ids) for i, t in enumerate(trajectories) if i != 4)
        assert sum(m.num_tokens for m in mini_batches) == expected_tokens
        assert sum(m.num_sequences for m in mini_batches) == 8
        for mini_batch in mini_batches:
            for micro in mini_batch.micro_batches:
                for row in range(micro["tokens"].shape[0]):
                    weight = float(micro["weights"][row].sum())
                    if weight > 0:
                        first = int(micro["labels"][row, 2])  # prompt [1, 2, 3]: label 2 is the first response token
                        total, rows = trained.get(first, (0.0, 0))
                        trained[first] = (total + weight, rows + 1)
    expected = {t.response_token_ids[0]: (float(len(t.response_token_ids)), 1)
                for i, t in enumerate(trajectories) if i != 4}
    assert trained == expected  # every trained trajectory exactly once over both ranks; padding carries no weight


# ----------------------------------------------------------------------------------------------- config

def test_rollout_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"rollout.samples_per_prompt"):
        load_config(None, ["data.mock=true", "rollout.samples_per_prompt=0"])
    with pytest.raises(ConfigError, match=r"rollout.tree.branching"):
        load_config(None, ["data.mock=true", "rollout.tree.depth=2", "rollout.tree.branching=1"])
    with pytest.raises(ConfigError, match=r"rollout.temperature"):
        load_config(None, ["data.mock=true", "rollout.temperature=0"])
    with pytest.raises(ConfigError, match=r"did you mean 'rollout.prompts_per_step'"):
        load_config(None, ["data.mock=true", "rollout.prompt_per_step=4"])
    config = load_config(None, ["data.mock=true", "rollout.tree.depth=3", "rollout.tree.branching=2",
                                "rollout.samples_per_prompt=4", "rollout.levels=[1,2]"])
    assert config.rollout.leaves_per_prompt == 16
    assert config.rollout.levels == [1, 2]


# ----------------------------------------------------------------------------------------------- scoring

def test_score_groups_runs_each_distinct_response_once_in_the_sandbox():
    from betterai_megatron.rewards.executor import CodeExecutor
    from betterai_megatron.rewards.sandbox_config import SandboxConfig
    from betterai_megatron.rl.rollout import score_groups

    problem = Problem(task_id="t/add_2", prompt='def add_2(x):\n    """Return x plus 2."""\n', entry_point="add_2",
                      tests="def check(candidate):\n    assert candidate(1) == 3\n    assert candidate(-2) == 0\n")
    right = "<think>\nAdd 2.\n</think>\n```python\ndef add_2(x):\n    return x + 2\n```"
    wrong = "<think>\nAdd 3.\n</think>\n```python\ndef add_2(x):\n    return x + 3\n```"
    unformatted = "def add_2(x):\n    return x + 2\n"
    tree = TrajectoryTree.with_prompt([1])
    trajectories = []
    for text in (right, wrong, right, unformatted):
        leaf = tree.add_segment(0, [7] * 5)
        trajectories.append(Trajectory(problem=problem, group_id=0, leaf=leaf, prompt_token_ids=[1],
                                       response_token_ids=[7] * 5, finish_reason="stop", text=text))
    group = RolloutGroup(problem=problem, group_id=0, round_index=0, tree=tree, trajectories=trajectories)
    with CodeExecutor(SandboxConfig(workers=1, timeout_s=5.0)) as executor:
        scorer = RolloutScorer(RewardsConfig(format_weight=0.1), executor)
        programs = score_groups([group], scorer=scorer)
    assert programs == 3  # the two identical responses are run once
    assert [t.reward for t in trajectories] == pytest.approx([1.1, 0.1, 1.1, 1.0])
    assert [t.passed for t in trajectories] == [True, False, True, True]
    assert [t.format_ok for t in trajectories] == [True, True, True, False]


def test_grpo_config_errors_name_the_key_and_the_fix(tmp_path):
    """Missing starting point (tokenizer, checkpoint, problems file) and unsupported layouts: one ConfigError that
    names every bad key, before any model is built."""
    from betterai_megatron.rl.grpo_stage import validate_grpo_config

    config_path = str(REPO_CONFIG)
    config = load_config(config_path, [f"run.dir={tmp_path}", f"data.tokenizer_model={tmp_path}/none.model",
                                       f"checkpoint.load_dir={tmp_path}/no_checkpoint",
                                       f"rollout.problems={tmp_path}/none.jsonl", "parallel.pp=2",
                                       "model.hidden_dropout=0.1"])
    with pytest.raises(ConfigError) as error:
        validate_grpo_config(config)
    message = str(error.value)
    for key in ("data.tokenizer_model", "checkpoint.load_dir", "rollout.problems", "parallel.pp=2",
                "model.hidden_dropout"):
        assert key in message, key
    assert "benchmarks.grpo_warmup" in message  # how to make the starting point of the example config
    # a run that resumes from its own checkpoint does not need checkpoint.load_dir any more
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("3")
    (tmp_path / "tok.model").write_text("")
    (tmp_path / "problems.jsonl").write_text("")
    config = load_config(config_path, [f"run.dir={tmp_path}", f"data.tokenizer_model={tmp_path}/tok.model",
                                       f"checkpoint.load_dir={tmp_path}/no_checkpoint",
                                       f"rollout.problems={tmp_path}/problems.jsonl"])
    validate_grpo_config(config)
