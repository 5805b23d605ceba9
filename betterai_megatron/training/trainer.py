"""The pretraining loop: megatron-core's schedules, DDP and optimizer, plus the little a real run needs on top.

Per optimiser step: zero the DDP grad buffers, run ``get_forward_backward_func()`` (no pipelining, 1F1B, or
interleaved 1F1B with vpp) over this rank's micro-batches, then a single all-reduce carries the reported loss,
every rank's gradient health and every rank's vote to stop (preemption signal, wall-time limit); skip the
update if the loss or any gradient is NaN/Inf (Megatron-LM counts such steps as skipped iterations), otherwise
``optimizer.step()`` and ``scheduler.step()``. With fp16 the optimizer's dynamic loss scaler keeps handling
overflows itself (it has to see them to lower the scale).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from betterai_megatron.config import Config
from betterai_megatron.training import fault_injection
from betterai_megatron.training.batches import micro_batches
from betterai_megatron.training.forward_step import gpt_forward_step
from betterai_megatron.training.signals import STOP_DURATION, STOP_SIGNAL

logger = logging.getLogger(__name__)

HISTORY_STEPS = 1000


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


@dataclass
class TrainingState:
    """Everything that advances with the run (and is saved in checkpoints)."""

    step: int = 0  # optimiser steps completed
    consumed_samples: int = 0  # the data position
    skipped_steps: int = 0  # total steps skipped for NaN/Inf
    consecutive_skips: int = 0
    # the newest per-step records, for a caller; bounded so that a run of a million steps does not grow
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_STEPS))


def wrap_with_ddp(chunks: list, *, transformer_config, config: Config) -> list[DistributedDataParallel]:
    """megatron-core DDP around each model chunk; only the first chunk gets buckets (Megatron-LM's choice)."""
    p = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/Inf steps are skipped and counted by the trainer instead
    )
    return [
        DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def attach_schedule_hooks(transformer_config, *, chunks: list, optimizer, config: Config) -> None:
    """Tell the schedules how to sync grads/params and finalise them (what Megatron-LM's training.py sets)."""
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if config.parallel.overlap_grad_reduce:
        grad_sync = [c.start_grad_sync for c in chunks]
        transformer_config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if config.parallel.overlap_param_gather and config.parallel.distributed_optimizer:
        param_sync = [c.start_param_sync for c in chunks]
        transformer_config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync


def _stats_device() -> torch.device:
    """Where per-step statistics are reduced: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _local_loss(losses_reduced: list[dict]) -> torch.Tensor:
    """This rank's (loss sum, token count): the last pipeline stage's tp-rank-0 ranks contribute (tp ranks hold
    identical values; cp and dp ranks hold disjoint tokens); every other rank contributes zeros."""
    total = torch.zeros(2, dtype=torch.float64, device=_stats_device())
    if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        for record in losses_reduced:
            total += record["lm loss"].detach().to(total.device, torch.float64)
    return total


def reduce_reported_loss(losses_reduced: list[dict]) -> tuple[float, float]:
    """Global (loss sum, token count) over the world."""
    total = _local_loss(losses_reduced)
    dist.all_reduce(total)
    return float(total[0]), float(total[1])


def local_gradients_finite(chunks: list) -> torch.Tensor:
    """0-d bool: every gradient in this rank's DDP buffers is finite. One pass (a sum per buffer: NaN and Inf
    propagate through a sum) instead of materialising an ``isfinite`` mask."""
    sums = [buffer.grad_data.sum(dtype=torch.float32)
            for chunk in chunks for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers)]
    if not sums:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(sums).sum())


@dataclass
class StepStatistics:
    """What all ranks agree on after a step's single all-reduce."""

    loss_sum: float
    tokens: float
    gradients_finite: bool
    stop_votes: tuple[int, int]  # (ranks that received a preemption signal, ranks past exit_duration_mins)


def reduce_step_statistics(losses_reduced: list[dict], chunks: list, *, check_gradients: bool,
                           stop_reason: int) -> StepStatistics:
    """One all-reduce per step carries the loss, the gradient health and the stop votes of every rank."""
    local = torch.zeros(5, dtype=torch.float64, device=_stats_device())
    local[:2] = _local_loss(losses_reduced)
    if check_gradients:
        local[2] = (~local_gradients_finite(chunks)).to(torch.float64)
    local[3] = float(stop_reason == STOP_SIGNAL)
    local[4] = float(stop_reason == STOP_DURATION)
    dist.all_reduce(local)
    values = local.tolist()
    return StepStatistics(loss_sum=values[0], tokens=values[1], gradients_finite=values[2] == 0,
                          stop_votes=(int(values[3]), int(values[4])))


def locate_nonfinite(losses_reduced: list[dict], chunks: list) -> str:
    """Which ranks saw a non-finite loss / gradient (a second collective, only after a bad step). Gradients are
    already all-reduced over data parallelism, so the loss names the data-parallel rank that went bad first."""
    local = torch.tensor([float(not math.isfinite(float(_local_loss(losses_reduced)[0]))),
                          float(not bool(local_gradients_finite(chunks)))], device=_stats_device())
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    loss_ranks = [r for r, flags in enumerate(gathered) if flags[0] > 0]
    grad_ranks = [r for r, flags in enumerate(gathered) if flags[1] > 0]
    parts = []
    if loss_ranks:
        parts.append(f"loss on rank(s) {loss_ranks}")
    if grad_ranks:
        parts.append(f"gradients on rank(s) {grad_ranks}")
    return "non-finite " + " and ".join(parts) if parts else "non-finite values (rank unknown)"


def has_dynamic_loss_scale(optimizer) -> bool:
    """fp16: the optimizer's grad scaler owns Inf handling (it must see overflows to lower the scale)."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(getattr(o, "grad_scaler", None) is not None for o in optimizers)


@dataclass
class StepResult:
    loss: float
    tokens: float
    grad_norm: float | None
    skipped: bool  # no parameter update this step
    step_time_s: float
    nonfinite: bool = False  # skipped because of a NaN/Inf loss or gradient
    nonfinite_where: str = ""  # which ranks (only when nonfinite)
    stop_votes: tuple[int, int] = (0, 0)


def train_step(*, chunks, optimizer, scheduler, dataset, state: TrainingState, config: Config,
               num_micro_batches: int, ranks, stop_reason: int = 0) -> StepResult:
    """One optimiser step over one global batch; ``stop_reason`` is this rank's vote to stop after it."""
    t = config.train
    start = time.perf_counter()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [
        micro_batches(dataset, consumed_samples=state.consumed_samples, num_micro_batches=num_micro_batches,
                      micro_batch_size=t.micro_batch_size, dp_rank=ranks.dp_rank, dp_size=ranks.dp_size,
                      cp_rank=ranks.cp_rank, cp_size=config.parallel.cp)
        for _ in chunks
    ]
    losses = get_forward_backward_func()(
        forward_step_func=fault_injection.forward_step_for(gpt_forward_step, step=state.step + 1,
                                                           rank=dist.get_rank()),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro_batches,
        seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=False,
    )
    stats = reduce_step_statistics(losses, chunks, check_gradients=not has_dynamic_loss_scale(optimizer),
                                   stop_reason=stop_reason)
    loss = stats.loss_sum / max(stats.tokens, 1.0)
    grad_norm = None
    nonfinite = not (math.isfinite(loss) and stats.gradients_finite)
    where = locate_nonfinite(losses, chunks) if nonfinite else ""
    skipped = nonfinite
    if not nonfinite:
        update_successful, grad_norm, _ = optimizer.step()
        skipped = not update_successful  # fp16 loss-scale overflow: the scaler lowers the scale
        if update_successful:
            scheduler.step(increment=1)
    state.consumed_samples += t.global_batch_size
    state.step += 1
    return StepResult(loss=loss, tokens=stats.tokens, grad_norm=grad_norm, skipped=skipped,
                      step_time_s=time.perf_counter() - start, nonfinite=nonfinite, nonfinite_where=where,
                      stop_votes=stats.stop_votes)


def evaluate(*, chunks, dataset, config: Config, num_micro_batches: int, ranks) -> float:
    """Mean validation loss over ``train.eval_iters`` global batches (forward only)."""
    t = config.train
    for chunk in chunks:
        chunk.eval()
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for index in range(t.eval_iters):
            iterators = [
                micro_batches(dataset, consumed_samples=index * t.global_batch_size,
                              num_micro_batches=num_micro_batches, micro_batch_size=t.micro_batch_size,
                              dp_rank=ranks.dp_rank, dp_size=ranks.dp_size, cp_rank=ranks.cp_rank,
                              cp_size=config.parallel.cp)
                for _ in chunks
            ]
            losses = get_forward_backward_func()(
                forward_step_func=gpt_forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=num_micro_batches, seq_length=t.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True,
            )
            batch_sum, batch_tokens = reduce_reported_loss(losses)
            loss_sum, tokens = loss_sum + batch_sum, tokens + batch_tokens
    for chunk in chunks:
        chunk.train()
    return loss_sum / max(tokens, 1.0)
