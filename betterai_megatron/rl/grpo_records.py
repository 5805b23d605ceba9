"""What a GRPO step leaves behind: its ``metrics.jsonl`` record and its ``trajectories/step_N.jsonl`` lines.

Metrics (``metrics.jsonl`` keys; rewards and rates over *every* trajectory sampled in the step, before filtering, so
the curve is not flattered by dynamic sampling): ``reward_mean``, ``reward_std``, ``pass_rate`` (all tests passed),
``format_rate`` (the strict reasoning format), ``response_length`` (tokens), ``kept_group_fraction`` (groups that
passed the group filter / groups sampled), ``clip_fraction``, ``entropy`` (policy entropy on trained tokens),
``kl`` (KL(pi || pi_ref) with ``grpo.kl_estimator`` when a reference policy is loaded, else ``approx_kl``),
``approx_kl`` (k3 estimate of KL(pi_old || pi_new) over the updates), ``first_ratio_min``/``first_ratio_max`` (the
importance ratio range of the first update: 1), ``generation_tokens_per_s`` (sampled tokens / generation wall
time), ``training_tokens_per_s`` (tokens of the trained sequences times epochs / time of log-prob recomputation and
updates), timings and counts.

Trajectory lines (one per root-to-leaf path, every group sampled in the step, kept or dropped by the filter):
``step``, ``group``, ``round`` (dynamic-sampling round), ``kept``, ``task_id``, ``level``, ``prompt``, ``response``,
``reasoning`` and ``code`` (as extracted for the reward), ``status``, ``tests_passed``/``tests_total``, ``passed``,
``reward`` = ``test_reward`` + ``rewards.format_weight`` x ``format_reward`` + ``length_penalty``, ``format_ok``,
``advantage``, ``response_tokens``, ``finish_reason``, and the path through the group's tree: ``segment_nodes``
(node ids, one for linear GRPO), ``segment_tokens`` and ``segment_advantages``.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

UPDATE_METRIC_KEYS = ("policy_loss", "pg_loss", "clip_fraction", "approx_kl", "entropy", "ratio_mean", "ratio_min",
                      "ratio_max", "logprob_mismatch_max", "logprob_mismatch_mean")


def step_record(*, step: int, collected, update, timing: dict, sampler, lr: float, has_reference: bool,
                curriculum_level: int) -> dict:
    """The ``metrics.jsonl`` record of one step (keys in the module docstring)."""
    trajectories = [t for g in collected.generated for t in g.trajectories]
    rewards = [t.reward for t in trajectories]
    lengths = [len(t.response_token_ids) for t in trajectories]
    trained_seconds = timing["logprob_s"] + timing["update_s"]
    record = {
        "step": step,
        "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward_std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        "pass_rate": statistics.fmean(float(t.passed) for t in trajectories) if trajectories else 0.0,
        "format_rate": statistics.fmean(float(t.format_ok) for t in trajectories) if trajectories else 0.0,
        "test_reward_mean": statistics.fmean(t.scored.test_reward for t in trajectories) if trajectories else 0.0,
        "response_length": statistics.fmean(lengths) if lengths else 0.0,
        "truncated_fraction": statistics.fmean(float(t.truncated) for t in trajectories) if trajectories else 0.0,
        "kept_group_fraction": collected.kept_group_fraction,
        "groups_sampled": len(collected.generated),
        "groups_trained": len(collected.kept),
        "trajectories_trained": sum(len(g.trajectories) for g in collected.kept),
        "sampling_rounds": collected.rounds,
        **(update.metrics or dict.fromkeys(UPDATE_METRIC_KEYS)),  # null when no group survived the filter
        "first_ratio_min": update.first_ratio_min if update.metrics else None,
        "first_ratio_max": update.first_ratio_max if update.metrics else None,
        "optimizer_steps": update.optimizer_steps,
        "skipped_updates": update.skipped_steps,
        "grad_norm": update.grad_norm,
        "lr": lr,
        "generation_tokens_per_s": sampler.generated_tokens / max(timing["generation_s"], 1e-9),
        "training_tokens_per_s": update.trained_tokens / trained_seconds if trained_seconds > 0 else 0.0,
        "generated_tokens": sampler.generated_tokens,
        "prefill_tokens": sampler.prefill_tokens,
        "curriculum_level": curriculum_level,
        **timing,
    }
    record["kl"] = record["ref_kl" if has_reference else "approx_kl"] if update.metrics else None
    return record


# ----------------------------------------------------------------------------------------------- outputs

def trajectory_record(trajectory, *, step: int, group) -> dict:
    """One line of ``trajectories/step_N.jsonl``."""
    from betterai_megatron.data.chat_template import parse_reasoning_response

    parsed = parse_reasoning_response(trajectory.text)
    scored = trajectory.scored
    verdict = scored.verdict
    record = {
        "step": step, "group": group.group_id, "round": group.round_index, "kept": group.kept,
        "task_id": trajectory.problem.task_id, "level": trajectory.problem.level,
        "prompt": trajectory.problem.prompt, "response": trajectory.text, "reasoning": parsed.reasoning,
        "code": scored.code, "status": verdict.status, "tests_passed": verdict.tests_passed,
        "tests_total": verdict.tests_total, "passed": verdict.passed, "reward": trajectory.reward,
        "test_reward": scored.test_reward, "format_reward": scored.format_reward,
        "length_penalty": scored.length_penalty, "format_ok": trajectory.format_ok,
        "advantage": trajectory.advantage, "response_tokens": len(trajectory.response_token_ids),
        "finish_reason": trajectory.finish_reason,
    }
    # the path through the group's tree (one node for linear GRPO): node ids, sizes and advantages of its segments
    path = group.tree.path(trajectory.leaf)
    advantages = trajectory.token_advantages.tolist()
    offsets = [0]
    for node in path:
        offsets.append(offsets[-1] + len(group.tree.segments[node]))
    record["segment_nodes"] = path
    record["segment_tokens"] = [end - start for start, end in itertools.pairwise(offsets)]
    record["segment_advantages"] = [advantages[start] if end > start else 0.0
                                    for start, end in itertools.pairwise(offsets)]
    return record


def write_trajectories(path: Path, groups, *, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for group in groups:
            handle.writelines(json.dumps(trajectory_record(trajectory, step=step, group=group)) + "\n" for trajectory in group.trajectories)
