"""GRPO policy updates: trajectories -> micro-batches -> old (and reference) log-probs -> clipped-surrogate steps.

Per GRPO step, with ``n`` trajectories (identical on every rank):

1. the trajectories are (optionally) shuffled once and cut into mini-batches of
   ``rollout.mini_batch_size_trajectories``; each mini-batch is one optimiser step. Its trajectories are dealt to the
   data-parallel ranks round-robin and grouped into micro-batches of ``train.micro_batch_size``; a mini-batch that
   does not fill ``dp * micro_batch_size`` evenly is padded with zero-weight copies of one of its trajectories (every
   rank must run the same number of micro-batches);
2. before any update, the trainer's own model recomputes ``log pi_old`` of every response token, micro-batch by
   micro-batch, with exactly the tensors the first update will see -- so the importance ratio of the first update
   is exactly 1 (tested), whatever the engine's numerics; the frozen reference policy adds ``log pi_ref`` when
   ``grpo.kl_coef > 0`` (:mod:`.reference_policy`);
3. ``rollout.epochs_per_step`` passes over the mini-batches run megatron-core's ``forward_backward_func`` with a
   forward step whose loss (:func:`~betterai_megatron.rl.policy_loss.compute_grpo_loss`) takes token log-probs from
   the vocab-parallel logits (``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` is ``-log p`` of a
   target under logits split over tp ranks; the entropy is reduced over tp the same way), then
   ``optimizer.step()``.

Loss scale. The aggregations are computed with the *mini-batch's* denominators (``global_num_tokens``,
``global_num_sequences``), so the micro-batch losses of all ranks sum to the mini-batch loss. megatron-core is set up
for per-token losses (``calculate_per_token_loss``): DDP sums gradients over dp ranks and ``finalize_model_grads``
divides them by the sum of the ``num_tokens`` the loss function returns. Each micro-batch returns
``num_tokens = 1`` and its loss times ``num_micro_batches * dp_size``, so the division restores the exact sum.

Micro-batch layout (``b`` trajectories, ``s`` = longest prompt + response - 1, padded to a multiple of 8):
``tokens [b, s]``, ``labels [b, s]`` (next tokens), ``position_ids [b, s]``, and per label position
``weights [b, s]`` (the response token's loss weight, 0 on prompt and padding), ``advantages [b, s]``,
``old_log_probs [b, s]``, ``ref_log_probs [b, s]``. Right padding needs no attention mask under causal attention.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from betterai_megatron.rl.kl import kl_penalty
from betterai_megatron.rl.policy_loss import compute_grpo_loss

PAD_MULTIPLE = 8


@dataclass
class UpdatePlan:
    """Sizes of the update phase; ``dp_rank``/``dp_size`` locate this rank among the data-parallel replicas."""

    micro_batch_size: int
    mini_batch_size_trajectories: int
    epochs: int
    dp_rank: int = 0
    dp_size: int = 1
    shuffle: bool = True
    seed: int = 0
    pad_token_id: int = 0


# ------------------------------------------------------------------------------------------------ batching

def trajectory_weights(trajectory, *, overlong_filtering: bool) -> torch.Tensor:
    """``[L]`` loss weights of a trajectory: its token weights, zeroed when it was truncated and DAPO's overlong
    filtering is on (``grpo.overlong_filtering``)."""
    weights = trajectory.token_weights
    if overlong_filtering and trajectory.truncated:
        return torch.zeros_like(weights)
    return weights


def collate_micro_batch(rows: Sequence[tuple], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``rows``: ``(prompt ids, response ids, advantages [L], weights [L][, sampled log-probs [L] or None])`` -> the
    tensors of the module docstring (plus ``sampled_log_probs [b, s]``, NaN where unknown)."""
    lengths = [len(row[0]) + len(row[1]) - 1 for row in rows]
    s = max(lengths)
    s = ((s + PAD_MULTIPLE - 1) // PAD_MULTIPLE) * PAD_MULTIPLE
    b = len(rows)
    tokens = torch.full((b, s), pad_token_id, dtype=torch.long)
    labels = torch.full((b, s), pad_token_id, dtype=torch.long)
    weights = torch.zeros(b, s)
    advantages = torch.zeros(b, s)
    sampled = torch.full((b, s), math.nan)
    for row, (prompt, response, token_advantages, token_weights, *rest) in enumerate(rows):
        sequence = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        tokens[row, : len(sequence) - 1] = sequence[:-1]
        labels[row, : len(sequence) - 1] = sequence[1:]
        first = len(prompt) - 1  # the label at position len(prompt) - 1 is the first response token
        weights[row, first: first + len(response)] = token_weights
        advantages[row, first: first + len(response)] = token_advantages
        if rest and rest[0] is not None:
            sampled[row, first: first + len(response)] = torch.tensor(rest[0], dtype=torch.float32)
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": position_ids, "weights": weights,
            "advantages": advantages, "sampled_log_probs": sampled}


@dataclass
class MiniBatch:
    """This rank's micro-batches of one mini-batch, and the mini-batch's global loss denominators."""

    micro_batches: list[dict[str, torch.Tensor]]
    num_tokens: float  # sum of loss weights over the whole mini-batch (all ranks)
    num_sequences: float  # trajectories with a non-zero weight in the whole mini-batch
    num_trajectories: int  # real trajectories in the whole mini-batch
    sequence_tokens: int  # real (unpadded) tokens of this rank's micro-batches


def build_mini_batches(trajectories: Sequence, *, plan: UpdatePlan, overlong_filtering: bool) -> list[MiniBatch]:
    """Shuffle (seeded, identical on every rank), cut into mini-batches, deal to dp ranks, pad, collate."""
    order = list(range(len(trajectories)))
    if plan.shuffle:
        random.Random(plan.seed).shuffle(order)
    per_step = plan.dp_size * plan.micro_batch_size
    mini_batches = []
    for start in range(0, len(order), plan.mini_batch_size_trajectories):
        members = order[start: start + plan.mini_batch_size_trajectories]
        rows = []
        for index in members:
            t = trajectories[index]
            rows.append((t.prompt_token_ids, t.response_token_ids, t.token_advantages,
                         trajectory_weights(t, overlong_filtering=overlong_filtering), t.sampled_log_probs))
        num_tokens = float(sum(float(r[3].sum()) for r in rows))
        num_sequences = float(sum(1 for r in rows if float(r[3].sum()) > 0))
        padded = rows + [(rows[0][0], rows[0][1], rows[0][2], torch.zeros_like(rows[0][3]), None)] * (
            -len(rows) % per_step)
        mine = padded[plan.dp_rank::plan.dp_size]
        micro = [collate_micro_batch(mine[i: i + plan.micro_batch_size], pad_token_id=plan.pad_token_id)
                 for i in range(0, len(mine), plan.micro_batch_size)]
        real = [row for position, row in enumerate(padded) if position < len(rows)][plan.dp_rank::plan.dp_size]
        mini_batches.append(MiniBatch(micro_batches=micro, num_tokens=num_tokens, num_sequences=num_sequences,
                                      num_trajectories=len(rows),
                                      sequence_tokens=sum(len(row[0]) + len(row[1]) for row in real)))
    return mini_batches


# ------------------------------------------------------------------------------------------------ log-probs

def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = _device()
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def token_log_probs_vocab_parallel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(label)``: logits ``[b, s, V/tp]`` (this rank's vocab shard), labels ``[b, s]`` -> ``[b, s]`` float32.

    megatron's ``vocab_parallel_cross_entropy`` works in place on float32 logits; pass a copy if they are needed
    afterwards.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float(), labels)


def entropy_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the full softmax from this rank's vocab shard: ``[b, s, V/tp] -> [b, s]`` float32, differentiable.

    ``H = log Z - E_p[z]`` with ``Z`` and ``sum_v exp(z_v) z_v`` all-reduced over the tp group (megatron's
    ``reduce_from_tensor_model_parallel_region``: all-reduce forward, identity backward -- right because everything
    after the reduction is replicated across tp ranks); a tp-wide max is subtracted first for stability.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    with torch.no_grad():
        shift = logits.max(dim=-1, keepdim=True).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - shift
    exp = torch.exp(shifted)
    normaliser = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    expected = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1))
    return torch.log(normaliser) - expected / normaliser


@torch.no_grad()
def compute_log_probs(model, mini_batches: Sequence[MiniBatch], *, key: str) -> float:
    """Store ``log p(labels)`` of ``model`` as ``micro_batch[key] [b, s]`` for every micro-batch; returns seconds.

    The model is called exactly as the update's forward step calls it (same tensors, same mode), so ``key =
    "old_log_probs"`` from the policy reproduces the first update's log-probs bit for bit.
    """
    start = time.perf_counter()
    for mini_batch in mini_batches:
        for micro in mini_batch.micro_batches:
            batch = _to_device(micro)
            logits = model(batch["tokens"], batch["position_ids"], None)
            micro[key] = token_log_probs_vocab_parallel(logits, batch["labels"]).cpu()
    return time.perf_counter() - start


def log_prob_mismatch(mini_batches: Sequence[MiniBatch], *, dp_group=None) -> tuple[float, float]:
    """``(max, mean)`` of ``|log pi_old - log pi_sampled|`` over trained tokens: the trainer's recomputed log-probs
    against the engine's (KV cache, gathered logits, possibly another precision). Large values mean generation and
    training disagree about the policy (verl logs the same as its rollout/actor probability difference)."""
    largest, total, count = 0.0, 0.0, 0.0
    for mini_batch in mini_batches:
        for micro in mini_batch.micro_batches:
            valid = (micro["weights"] > 0) & torch.isfinite(micro["sampled_log_probs"])
            if bool(valid.any()):
                diff = (micro["old_log_probs"] - micro["sampled_log_probs"]).abs()[valid]
                largest = max(largest, float(diff.max()))
                total += float(diff.sum())
                count += float(valid.sum())
    values = torch.tensor([total, count], dtype=torch.float64, device=_device())
    peak = torch.tensor([largest], dtype=torch.float64, device=_device())
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(values, group=dp_group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=dp_group)
    return float(peak[0]), float(values[0] / values[1]) if values[1] > 0 else 0.0


# ------------------------------------------------------------------------------------------------ updates

@dataclass
class _Accumulator:
    """Token-weighted sums of the per-micro-batch metrics of one mini-batch (reduced over dp afterwards)."""

    sums: dict[str, float] = field(default_factory=dict)
    ratio_min: float = math.inf
    ratio_max: float = -math.inf

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)


SUMMED = ("loss", "pg_loss", "weight", "clip_fraction", "approx_kl", "entropy", "ref_kl", "ratio_mean")


def _loss_func(batch, grpo, mini_batch: MiniBatch, scale: float, accumulator: _Accumulator, output_tensor):
    """The GRPO loss of one micro-batch from the logits ``output_tensor [b, s, V/tp]`` (see module docstring)."""
    logits = output_tensor
    weights = batch["weights"]
    if grpo.entropy_coef > 0:
        entropy = entropy_vocab_parallel(logits)
        log_probs = token_log_probs_vocab_parallel(logits.clone(), batch["labels"])
    else:
        with torch.no_grad():
            entropy_metric = entropy_vocab_parallel(logits)
        entropy = None
        log_probs = token_log_probs_vocab_parallel(logits, batch["labels"])
    ref_log_probs = batch.get("ref_log_probs")
    loss, metrics = compute_grpo_loss(
        config=grpo, log_probs=log_probs, old_log_probs=batch["old_log_probs"], advantages=batch["advantages"],
        response_mask=weights, ref_log_probs=ref_log_probs, entropy=entropy,
        global_num_tokens=mini_batch.num_tokens, global_num_sequences=mini_batch.num_sequences)
    with torch.no_grad():
        weight = float(weights.sum())
        entropy_values = entropy if entropy is not None else entropy_metric
        accumulator.add("loss", metrics["loss"])
        accumulator.add("pg_loss", metrics["pg_loss"])
        accumulator.add("weight", weight)
        for name in ("clip_fraction", "approx_kl", "ratio_mean"):
            accumulator.add(name, float(metrics[name]) * weight)
        accumulator.add("entropy", float((entropy_values * weights).sum()))
        if ref_log_probs is not None:
            kl = kl_penalty(log_probs, ref_log_probs, estimator=grpo.kl_estimator, clamp=grpo.kl_clamp)
            accumulator.add("ref_kl", float((kl * weights).sum()))
        if weight > 0:
            accumulator.ratio_min = min(accumulator.ratio_min, float(metrics["ratio_min"]))
            accumulator.ratio_max = max(accumulator.ratio_max, float(metrics["ratio_max"]))
    num_tokens = torch.ones((), dtype=torch.int, device=loss.device)
    return loss * scale, num_tokens, {}


def _forward_step(data_iterator, model, *, grpo, mini_batch: MiniBatch, scale: float, accumulator: _Accumulator):
    batch = _to_device(next(data_iterator))
    logits = model(batch["tokens"], batch["position_ids"], None)
    return logits, partial(_loss_func, batch, grpo, mini_batch, scale, accumulator)


@dataclass
class UpdateResult:
    """Metrics of one step's updates (means are weighted by response-token loss weights)."""

    optimizer_steps: int = 0
    skipped_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    first_ratio_min: float = 1.0  # importance ratio range of the very first update (1 by construction)
    first_ratio_max: float = 1.0
    grad_norm: float | None = None
    trained_tokens: int = 0
    seconds: float = 0.0


def _reduce_accumulator(accumulator: _Accumulator, loss_ok: bool, *, dp_group) -> tuple[dict[str, float], bool]:
    """Sum the metric sums (and AND the finiteness) over data-parallel ranks; min/max the ratios."""
    values = torch.tensor([accumulator.sums.get(k, 0.0) for k in SUMMED] + [0.0 if loss_ok else 1.0],
                          dtype=torch.float64, device=_device())
    extremes = torch.tensor([-accumulator.ratio_min, accumulator.ratio_max], dtype=torch.float64, device=_device())
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(values, group=dp_group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=dp_group)
    sums = dict(zip(SUMMED, values[:-1].tolist()))
    sums["ratio_min"], sums["ratio_max"] = -float(extremes[0]), float(extremes[1])
    return sums, bool(values[-1] == 0)


def run_policy_updates(*, chunks: list, optimizer, mini_batches: Sequence[MiniBatch], grpo, plan: UpdatePlan,
                       dp_group=None) -> UpdateResult:
    """``plan.epochs`` passes of clipped-surrogate updates, one optimiser step per mini-batch.

    ``mini_batches`` must already carry ``old_log_probs`` (and ``ref_log_probs`` when ``grpo.kl_coef > 0``).
    A mini-batch whose loss is not finite on some rank is skipped (no optimiser step) on every rank.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(chunks) != 1:
        raise NotImplementedError("GRPO updates run without pipeline parallelism (one model chunk)")
    model = chunks[0]
    result = UpdateResult()
    totals: dict[str, float] = {}
    start = time.perf_counter()
    order = list(range(len(mini_batches)))
    for epoch in range(plan.epochs):
        if epoch and plan.shuffle:
            random.Random(plan.seed * 1000 + epoch).shuffle(order)
        for index in order:
            mini_batch = mini_batches[index]
            accumulator = _Accumulator()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            scale = float(len(mini_batch.micro_batches) * plan.dp_size)
            step = partial(_forward_step, grpo=grpo, mini_batch=mini_batch, scale=scale, accumulator=accumulator)
            seq_length = max(m["tokens"].shape[1] for m in mini_batch.micro_batches)
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(mini_batch.micro_batches), model=model,
                num_microbatches=len(mini_batch.micro_batches), seq_length=seq_length,
                micro_batch_size=plan.micro_batch_size, forward_only=False)
            loss_ok = math.isfinite(accumulator.sums.get("loss", 0.0)) and _gradients_finite(model)
            sums, all_ok = _reduce_accumulator(accumulator, loss_ok, dp_group=dp_group)
            if result.optimizer_steps + result.skipped_steps == 0:
                result.first_ratio_min, result.first_ratio_max = sums["ratio_min"], sums["ratio_max"]
            if all_ok:
                _, grad_norm, _ = optimizer.step()
                result.optimizer_steps += 1
                result.grad_norm = None if grad_norm is None else float(grad_norm)
            else:
                result.skipped_steps += 1
            for key, value in sums.items():
                if key in ("ratio_min", "ratio_max"):
                    totals[key] = min(totals.get(key, math.inf), value) if key == "ratio_min" else max(
                        totals.get(key, -math.inf), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value
            result.trained_tokens += mini_batch.sequence_tokens
    result.seconds = time.perf_counter() - start
    result.metrics = _finish_metrics(totals, num_updates=max(result.optimizer_steps + result.skipped_steps, 1),
                                     has_reference=grpo.kl_coef > 0)
    return result


def _gradients_finite(model) -> bool:
    from betterai_megatron.training.trainer import local_gradients_finite

    return bool(local_gradients_finite([model]))


def _finish_metrics(totals: dict[str, float], *, num_updates: int, has_reference: bool) -> dict[str, float]:
    weight = max(totals.get("weight", 0.0), 1e-12)
    metrics = {
        "policy_loss": totals.get("loss", 0.0) / num_updates,  # not "loss": TensorBoard maps that to "lm loss"
        "pg_loss": totals.get("pg_loss", 0.0) / num_updates,
        "clip_fraction": totals.get("clip_fraction", 0.0) / weight,
        "approx_kl": totals.get("approx_kl", 0.0) / weight,
        "entropy": totals.get("entropy", 0.0) / weight,
        "ratio_mean": totals.get("ratio_mean", 0.0) / weight,
        "ratio_min": totals.get("ratio_min", 1.0),
        "ratio_max": totals.get("ratio_max", 1.0),
    }
    if has_reference:
        metrics["ref_kl"] = totals.get("ref_kl", 0.0) / weight
    return metrics


def with_response_length_default(grpo, *, max_new_tokens: int):
    """``grpo`` with Dr. GRPO's constant ``max_response_length_tokens`` defaulting to the generation limit (the
    tensors here are whole sequences, so "the padded length" would include the prompt)."""
    if grpo.max_response_length_tokens is not None:
        return grpo
    return dataclasses.replace(grpo, max_response_length_tokens=max_new_tokens)
