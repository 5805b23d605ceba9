"""``betterai grpo`` end to end under real ``torchrun --nproc-per-node 2`` (gloo) at tp=2, from a briefly warmed-up
checkpoint saved at tp=1 (so loading also reshards): tree rollouts (depth 2), DAPO dynamic sampling with refill, a
frozen reference policy (KL term on) and the DAPO length penalty (which gives groups of an untrained policy a reward
spread), two GRPO steps, then a checkpoint.

Then the run resumes from its own checkpoint at another layout (tp=1) for a third step. Few launches on purpose:
process start-up dominates on a small CPU box. Checked against independent references, all
computed here from the step's trajectories file: every reward against the reward definition, every segment advantage
against a naive TreeRL/GRPO computation from the rewards (``(V(s) - V(parent)) / (std + eps)``, which is plain GRPO
for the unbranched paths), the kept groups and the kept-group fraction against the DAPO rule, the metrics against
the file. The first update's importance ratio is 1; the trainer's recomputed log-probs (vocab-parallel over tp=2)
agree with the generation engine's; the KL to the reference is 0 before the first update and positive after it."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest

from tests.conftest import REPO, read_metrics, run_betterai

CONFIG = REPO / "examples" / "configs" / "tiny_grpo.yaml"
METRIC_KEYS = ("reward_mean", "reward_std", "pass_rate", "format_rate", "kl", "clip_fraction", "entropy",
               "response_length", "kept_group_fraction", "generation_tokens_per_s", "training_tokens_per_s")
TRAJECTORY_KEYS = ("prompt", "reasoning", "code", "tests_passed", "tests_total", "reward", "advantage", "status")
MAX_NEW_TOKENS = 40
OVERLONG_CACHE = 32  # the length penalty ramps from 0 at 8 tokens to -1 at 40
PROMPTS_PER_STEP = 2


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    """A tokenizer and a briefly SFT-trained tiny policy (tp=1 checkpoint) from the benchmark's warm-up helper."""
    out = tmp_path_factory.mktemp("warmup")
    # a one-process job of its own: not the rendezvous of a process group this pytest process may hold
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "benchmarks.grpo_warmup", "--out", str(out), "--steps", "25",
                    "--levels", "1"], cwd=REPO, env=env, check=True, capture_output=True, timeout=400)
    return json.loads((out / "warmup.json").read_text())


def naive_penalty(length: int) -> float:
    soft_start = MAX_NEW_TOKENS - OVERLONG_CACHE
    if length <= soft_start:
        return 0.0
    return -1.0 if length > MAX_NEW_TOKENS else (soft_start - length) / OVERLONG_CACHE


def naive_tree_advantages(lines: list[dict]) -> dict[int, float]:
    """Node -> (V(node) - V(parent)) / (std of the leaf rewards + 1e-6), V = mean reward of the leaves below."""
    rewards = [line["reward"] for line in lines]
    value = {0: statistics.fmean(rewards)}
    parent = {}
    for line in lines:
        for depth, node in enumerate(line["segment_nodes"]):
            parent[node] = line["segment_nodes"][depth - 1] if depth else 0
    for node in parent:
        value[node] = statistics.fmean(line["reward"] for line in lines if node in line["segment_nodes"])
    std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    return {node: (value[node] - value[parent[node]]) / (std + 1e-6) for node in parent}


def last_code_block(text: str) -> str | None:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)
    return blocks[-1] if blocks else None


def check_step_file(lines: list[dict], record: dict) -> None:
    groups: dict[int, list[dict]] = {}
    for line in lines:
        for key in TRAJECTORY_KEYS:
            assert key in line, key
        assert line["passed"] == (line["status"] == "passed")
        assert line["test_reward"] == (1.0 if line["passed"] else 0.0)  # binary test reward
        assert line["tests_passed"] <= line["tests_total"]
        assert line["length_penalty"] == pytest.approx(naive_penalty(line["response_tokens"]), abs=1e-6)
        expected = line["test_reward"] + 0.1 * line["format_reward"] + naive_penalty(line["response_tokens"])
        assert line["reward"] == pytest.approx(expected, abs=1e-6)
        if line["format_reward"] == 1.0:
            assert line["code"] == last_code_block(line["response"])
            assert line["reasoning"] is not None
        assert sum(line["segment_tokens"]) == line["response_tokens"] <= MAX_NEW_TOKENS
        groups.setdefault(line["group"], []).append(line)
    # advantages: the naive tree computation (GRPO for the unbranched paths)
    for group in groups.values():
        expected = naive_tree_advantages(group)
        for line in group:
            for node, tokens, advantage in zip(line["segment_nodes"], line["segment_tokens"],
                                               line["segment_advantages"]):
                if tokens:
                    assert advantage == pytest.approx(expected[node], rel=1e-4, abs=1e-4)
            assert line["advantage"] == pytest.approx(expected[line["segment_nodes"][-1]], rel=1e-4, abs=1e-4)
    # DAPO dynamic sampling: only groups with a reward spread are trained, at most prompts_per_step of them
    spread = {g for g, group in groups.items() if max(l["reward"] for l in group) - min(l["reward"] for l in group)
              > 1e-6}
    kept = {g for g, group in groups.items() if group[0]["kept"]}
    assert all(line["kept"] == group[0]["kept"] for group in groups.values() for line in group)
    assert kept <= spread and len(kept) == min(PROMPTS_PER_STEP, len(spread))
    assert record["groups_sampled"] == len(groups)
    assert record["kept_group_fraction"] == pytest.approx(len(spread) / len(groups))
    assert record["groups_trained"] == len(kept)
    assert record["trajectories_trained"] == sum(len(groups[g]) for g in kept)
    assert record["sampling_rounds"] == 1 + (max(l["round"] for l in lines))
    # metrics are over every sampled trajectory, not only the trained ones
    assert record["reward_mean"] == pytest.approx(statistics.fmean(l["reward"] for l in lines), abs=1e-6)
    assert record["pass_rate"] == pytest.approx(statistics.fmean(float(l["passed"]) for l in lines), abs=1e-6)
    assert record["response_length"] == pytest.approx(statistics.fmean(l["response_tokens"] for l in lines))


def grpo_args(warm_start: dict, run_dir, *extra: str) -> list[str]:
    return ["grpo", "--config", str(CONFIG), f"run.dir={run_dir}", f"data.tokenizer_model={warm_start['tokenizer_model']}",
            f"checkpoint.load_dir={warm_start['checkpoint_dir']}", f"rollout.problems={warm_start['grpo_problems']}",
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}", "rollout.samples_per_prompt=2",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}", "rollout.tree.depth=2", "rollout.tree.branching=2",
            "rollout.tree.min_continuation_tokens=4", "rollout.max_refill_rounds=1",
            "rollout.mini_batch_size_trajectories=8", "train.micro_batch_size=2", "rewards.group_filter=dapo",
            "rewards.length_penalty=dapo_overlong", f"rewards.overlong_max_tokens={MAX_NEW_TOKENS}",
            f"rewards.overlong_cache_tokens={OVERLONG_CACHE}", "rewards.format_weight=0.1", "grpo.kl_coef=0.01",
            "sandbox.workers=1", "log.tensorboard=false", *extra]


def check_record(record: dict, run_dir) -> int:
    """Check one step's metrics against its trajectories file; returns the number of branched paths."""
    lines = [json.loads(line) for line in
             (run_dir / "trajectories" / f"step_{record['step']}.jsonl").read_text().splitlines()]
    check_step_file(lines, record)
    assert record["groups_trained"] >= 1  # the length penalty gives almost every group a reward spread
    for key in METRIC_KEYS:
        assert isinstance(record.get(key), (int, float)) and math.isfinite(record[key]), key
    # recomputed old log-probs == the first update's log-probs: the ratio is exactly 1 there
    assert record["first_ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert record["first_ratio_max"] == pytest.approx(1.0, abs=1e-6)
    # the trainer's log-probs (vocab-parallel at tp=2) against the engine's (gathered logits, KV cache)
    assert record["logprob_mismatch_max"] < 1e-3
    assert record["optimizer_steps"] == 1  # at most 8 trajectories: one mini-batch
    assert record["kl"] == record["ref_kl"]
    return sum(len(line["segment_nodes"]) == 2 for line in lines)


@pytest.mark.distributed
def test_grpo_tp2_tree_rollouts_dynamic_sampling_reference_policy_and_resume(warm_start, tmp_path):
    run_dir = tmp_path / "run"
    run_betterai(grpo_args(warm_start, run_dir, "parallel.tp=2", "train.steps=2"), nproc=2, timeout=600)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert sum(check_record(record, run_dir) for record in records), "no trajectory branched"
    # the reference is the starting checkpoint, loaded on its own: in step 1's only update the policy still equals it
    assert records[0]["ref_kl"] == pytest.approx(0.0, abs=1e-7)
    assert records[1]["ref_kl"] > 1e-9  # after one optimiser step the policy has moved away
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert json.loads((run_dir / "grpo_state.json").read_text())["step"] == 2

    # resume at another layout (tp=1, one process): the policy continues from its own step-2 checkpoint, the
    # reference is still the starting checkpoint (KL > 0 at once), the curriculum state is restored
    result = run_betterai(grpo_args(warm_start, run_dir, "train.steps=3"), nproc=1, timeout=600)
    assert "the curriculum restarts" not in result.stderr + result.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    check_record(records[2], run_dir)
    assert records[2]["ref_kl"] > 1e-9
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert json.loads((run_dir / "grpo_state.json").read_text())["step"] == 3
