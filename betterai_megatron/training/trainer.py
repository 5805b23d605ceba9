"""The pretraining loop: megatron-core's schedules, DDP and optimizer, plus the little a real run needs on top.

Per optimiser step: zero the DDP grad buffers, run ``get_forward_backward_func()`` (no pipelining, 1F1B, or
interleaved 1F1B with vpp) over this rank's micro-batches, reduce the reported loss over the world, skip the
update if the loss or any gradient is NaN/Inf, otherwise ``optimizer.step()`` and ``scheduler.step()``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from betterai_megatron.config import Config
from betterai_megatron.training.batches import micro_batches
from betterai_megatron.training.forward_step import gpt_forward_step

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


@dataclass
class TrainingState:
    """Everything that advances with the run (and is saved in checkpoints)."""

    step: int = 0  # optimiser steps completed
    consumed_samples: int = 0  # the data position
    skipped_steps: int = 0  # total steps skipped for NaN/Inf
    consecutive_skips: int = 0
    history: list = field(default_factory=list)  # per-step loss records kept in memory for the caller


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


def reduce_reported_loss(losses_reduced: list[dict]) -> tuple[float, float]:
    """Global (loss sum, token count) over the world: the last pipeline stage's tp-rank-0 ranks contribute
    (tp ranks hold identical values; cp and dp ranks hold disjoint tokens)."""
    total = torch.zeros(2, dtype=torch.float64)
    contributes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if contributes:
        for record in losses_reduced:
            total += record["lm loss"].detach().to("cpu", torch.float64)
    dist.all_reduce(total)
    return float(total[0]), float(total[1])


def gradients_finite(chunks: list) -> bool:
    """True if every gradient buffer on every rank is finite (one all-reduce of a flag)."""
    finite = True
    for chunk in chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            if not torch.isfinite(buffer.grad_data).all():
                finite = False
    flag = torch.tensor([1 if finite else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class StepResult:
    loss: float
    tokens: float
    grad_norm: float | None
    skipped: bool
    step_time_s: float


def train_step(*, chunks, optimizer, scheduler, dataset, state: TrainingState, config: Config,
               num_micro_batches: int, ranks) -> StepResult:
    """One optimiser step over one global batch."""
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
        forward_step_func=gpt_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro_batches,
        seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=False,
    )
    loss_sum, tokens = reduce_reported_loss(losses)
    loss = loss_sum / max(tokens, 1.0)
    grad_norm = None
    skipped = not (math.isfinite(loss) and gradients_finite(chunks))
    if not skipped:
        update_successful, grad_norm, _ = optimizer.step()
        skipped = not update_successful
        if update_successful:
            scheduler.step(increment=1)
    state.consumed_samples += t.global_batch_size
    state.step += 1
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=skipped,
                      step_time_s=time.perf_counter() - start)


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
