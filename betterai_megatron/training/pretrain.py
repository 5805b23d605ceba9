"""Pretraining stage: set up the layout, model, optimiser and data from a config, then run the loop."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from betterai_megatron.config import Config, dump_yaml, validate_layout
from betterai_megatron.model.builder import build_model_chunks
from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
from betterai_megatron.platform.distributed import init_distributed
from betterai_megatron.training.data import build_datasets
from betterai_megatron.training.metrics import MetricsWriter
from betterai_megatron.training.optimizer import build_optimizer, build_scheduler
from betterai_megatron.training.trainer import (
    TrainingDiverged,
    TrainingState,
    attach_schedule_hooks,
    evaluate,
    train_step,
    wrap_with_ddp,
)

logger = logging.getLogger(__name__)


def run_pretraining(config: Config, *, build_datasets=build_datasets) -> TrainingState:
    """Train for ``train.steps`` optimiser steps; returns the final state (same on every rank).

    ``build_datasets(config, train_samples=, valid_samples=) -> (train, valid)`` is where samples come from:
    megatron GPT datasets for pretraining, packed conversations for SFT (:mod:`betterai_megatron.training.sft`)."""
    info = init_distributed(backend=config.parallel.backend)
    validate_layout(config, info.world_size)
    ranks = initialize_parallel(config.parallel, seed=config.train.seed)
    run_dir = Path(config.run.dir)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, run_dir / "config.yaml")
    t = config.train
    chunks, transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                    seq_length=t.seq_length, seed=t.seed)
    chunks = wrap_with_ddp(chunks, transformer_config=transformer_config, config=config)
    optimizer = build_optimizer(train=t, model=config.model, parallel=config.parallel, chunks=chunks)
    scheduler = build_scheduler(train=t, optimizer=optimizer)
    attach_schedule_hooks(transformer_config, chunks=chunks, optimizer=optimizer, config=config)
    num_micro_batches = t.global_batch_size // (t.micro_batch_size * ranks.dp_size)
    valid_samples = (t.steps // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_dataset, valid_dataset = build_datasets(config, train_samples=max(t.steps, 1) * t.global_batch_size,
                                                  valid_samples=valid_samples)
    metrics = MetricsWriter(run_dir, enabled=info.rank == 0, tensorboard=config.log.tensorboard,
                            total_steps=t.steps)
    state = TrainingState()
    tokens_per_step = t.global_batch_size * t.seq_length
    try:
        while state.step < t.steps:
            result = train_step(chunks=chunks, optimizer=optimizer, scheduler=scheduler, dataset=train_dataset,
                                state=state, config=config, num_micro_batches=num_micro_batches, ranks=ranks)
            if result.skipped:
                state.skipped_steps += 1
                state.consecutive_skips += 1
                logger.warning("step %d: NaN/Inf in loss or gradients on some rank (loss=%s); update skipped",
                               state.step, result.loss)
                if state.consecutive_skips >= t.max_skipped_steps:
                    raise TrainingDiverged(
                        f"rank {info.rank}: {state.consecutive_skips} consecutive steps skipped for NaN/Inf "
                        f"(last at step {state.step}, loss={result.loss}); stopping (train.max_skipped_steps="
                        f"{t.max_skipped_steps})")
            else:
                state.consecutive_skips = 0
            record = {
                "step": state.step,
                "loss": result.loss,
                "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "batch_size": t.global_batch_size,
                "tokens_per_s": tokens_per_step / result.step_time_s,
                "step_time_s": result.step_time_s,
                "consumed_samples": state.consumed_samples,
                "skipped_steps": state.skipped_steps,
            }
            state.history.append(record)
            if state.step % config.log.interval == 0 or state.step == t.steps:
                metrics.log(record)
                metrics.console(record)
            if valid_dataset is not None and t.eval_interval and state.step % t.eval_interval == 0:
                val_loss = evaluate(chunks=chunks, dataset=valid_dataset, config=config,
                                    num_micro_batches=num_micro_batches, ranks=ranks)
                metrics.log({"step": state.step, "val_loss": val_loss})
                if info.rank == 0:
                    print(f" validation loss at iteration {state.step}: lm loss {val_loss:.6E}", flush=True)
    finally:
        metrics.close()
        if dist.is_initialized():
            dist.barrier()
        destroy_parallel()
    return state
