"""Pretraining stage: set up the layout, model, optimiser and data from a config, resume, run the loop, save.

The loop around :func:`~betterai_megatron.training.trainer.train_step` adds what a weeks-long run needs:
checkpoints every ``checkpoint.save_interval`` steps and at the end (:mod:`checkpointing`), automatic resume,
a clean stop with a checkpoint on SIGTERM/SIGUSR1 or after ``train.exit_duration_mins`` (:mod:`signals`), and
NaN/Inf steps skipped, counted, logged — and fatal after ``train.max_skipped_steps`` in a row.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from betterai_megatron.config import Config, ConfigError, dump_yaml, validate_layout
from betterai_megatron.model.builder import build_model_chunks
from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
from betterai_megatron.platform.distributed import init_distributed
from betterai_megatron.training import fault_injection
from betterai_megatron.training.checkpointing import Checkpointer
from betterai_megatron.training.data import build_datasets
from betterai_megatron.training.metrics import MetricsWriter, ThroughputEstimator
from betterai_megatron.training.optimizer import build_optimizer, build_scheduler
from betterai_megatron.training.signals import (
    NO_STOP,
    STOP_DURATION,
    STOP_SIGNAL,
    StopRequest,
)
from betterai_megatron.training.trainer import (
    StepResult,
    TrainingDiverged,
    TrainingState,
    attach_schedule_hooks,
    evaluate,
    train_step,
    wrap_with_ddp,
)

logger = logging.getLogger(__name__)


def build_trainable_model(config: Config, *, run_dir: Path):
    """What every training stage (pretrain, SFT, GRPO) trains: the DDP-wrapped model chunks, the optimiser, the
    scheduler and the checkpointer, with the checkpoint the stage resumes (or starts) from already loaded.

    Returns ``(chunks, optimizer, scheduler, checkpointer, loaded)``; ``loaded`` is None on a fresh start."""
    t = config.train
    chunks, transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                    seq_length=t.seq_length, seed=t.seed)
    chunks = wrap_with_ddp(chunks, transformer_config=transformer_config, config=config)
    optimizer = build_optimizer(train=t, model=config.model, parallel=config.parallel, chunks=chunks)
    scheduler = build_scheduler(train=t, optimizer=optimizer)
    attach_schedule_hooks(transformer_config, chunks=chunks, optimizer=optimizer, config=config)
    checkpointer = Checkpointer(checkpoint=config.checkpoint, run_dir=run_dir, parallel=config.parallel)
    loaded = checkpointer.load(chunks=chunks, optimizer=optimizer, scheduler=scheduler)
    return chunks, optimizer, scheduler, checkpointer, loaded


def run_pretraining(config: Config, *, build_datasets=build_datasets) -> TrainingState:
    """Train until ``train.steps`` optimiser steps are done (or a stop request); returns the final state.

    ``build_datasets(config, train_samples=, valid_samples=) -> (train, valid)`` is where samples come from:
    megatron GPT datasets for pretraining, packed conversations for SFT (:mod:`betterai_megatron.training.sft`)."""
    info = init_distributed(backend=config.parallel.backend)
    validate_layout(config, info.world_size)
    _validate_loop_config(config)
    ranks = initialize_parallel(config.parallel, seed=config.train.seed)
    run_dir = Path(config.run.dir)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, run_dir / "config.yaml")
    t = config.train
    chunks, optimizer, scheduler, checkpointer, loaded = build_trainable_model(config, run_dir=run_dir)
    state = TrainingState(**loaded.training_state) if loaded is not None else TrainingState()
    valid_samples = (t.steps // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_dataset, valid_dataset = build_datasets(config, train_samples=max(t.steps, 1) * t.global_batch_size,
                                                  valid_samples=valid_samples)
    metrics = MetricsWriter(run_dir, enabled=info.rank == 0, tensorboard=config.log.tensorboard,
                            total_steps=t.steps, first_step=state.step)
    stop = StopRequest(exit_duration_mins=t.exit_duration_mins).install()
    loop = _Loop(config=config, chunks=chunks, optimizer=optimizer, scheduler=scheduler, ranks=ranks,
                 checkpointer=checkpointer, metrics=metrics, stop=stop, train_dataset=train_dataset,
                 valid_dataset=valid_dataset, rank=info.rank,
                 throughput=ThroughputEstimator.for_config(config, world_size=info.world_size))
    try:
        loop.run(state)
    except BaseException:
        # no collectives here: other ranks may be gone; torchrun tears the job down when this process exits
        stop.restore()
        metrics.close()
        raise
    stop.restore()
    checkpointer.close()  # waits for an asynchronous save and commits it
    metrics.close()
    if dist.is_initialized():
        dist.barrier()
    destroy_parallel()
    return state


def _validate_loop_config(config: Config) -> None:
    c, t = config.checkpoint, config.train
    problems = [f"{key}={value} must be >= 1" for key, value in (
        ("checkpoint.save_interval", c.save_interval), ("checkpoint.keep_last", c.keep_last),
        ("train.max_skipped_steps", t.max_skipped_steps), ("train.eval_interval", t.eval_interval))
        if value is not None and value < 1]
    if t.exit_duration_mins is not None and t.exit_duration_mins <= 0:
        problems.append(f"train.exit_duration_mins={t.exit_duration_mins} must be > 0")
    if c.load_weights_only and not c.load_dir:
        problems.append("checkpoint.load_weights_only=true needs checkpoint.load_dir (the checkpoint to start from)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


class _Loop:
    """The step loop of one pretraining run (state lives in TrainingState; this only holds the parts)."""

    def __init__(self, *, config: Config, chunks, optimizer, scheduler, ranks, checkpointer: Checkpointer,
                 metrics: MetricsWriter, stop: StopRequest, train_dataset, valid_dataset, rank: int,
                 throughput: ThroughputEstimator):
        self.config, self.chunks, self.optimizer, self.scheduler = config, chunks, optimizer, scheduler
        self.ranks, self.checkpointer, self.metrics, self.stop = ranks, checkpointer, metrics, stop
        self.train_dataset, self.valid_dataset, self.rank = train_dataset, valid_dataset, rank
        self.throughput = throughput
        t = config.train
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * ranks.dp_size)

    def run(self, state: TrainingState) -> None:
        t, c = self.config.train, self.config.checkpoint
        if state.step >= t.steps and self.rank == 0:
            logger.info("resumed at step %d: train.steps=%d already reached, nothing to train", state.step, t.steps)
        while state.step < t.steps:
            result = train_step(chunks=self.chunks, optimizer=self.optimizer, scheduler=self.scheduler,
                                dataset=self.train_dataset, state=state, config=self.config,
                                num_micro_batches=self.num_micro_batches, ranks=self.ranks,
                                stop_reason=self.stop.local_reason())
            diverged = self._account_for_skip(result, state)
            self._log(result, state)
            if diverged:
                raise TrainingDiverged(diverged)
            self.checkpointer.finalize(blocking=False)  # commit an asynchronous save that has finished
            if any(result.stop_votes):
                reason = self.stop.describe(STOP_SIGNAL if result.stop_votes[0] else STOP_DURATION)
                self._save(state)
                self.checkpointer.finalize(blocking=True)
                if self.rank == 0:
                    logger.warning("%s: saved a checkpoint at step %d; stopping (rerun to resume)", reason,
                                   state.step)
                return
            if c.save_interval and state.step % c.save_interval == 0:
                self._save(state)
            fault_injection.maybe_stall(step=state.step, interrupted=lambda: self.stop.local_reason() != NO_STOP)
        if c.save_on_exit:
            self._save(state)

    def _save(self, state: TrainingState) -> None:
        self.checkpointer.save(chunks=self.chunks, optimizer=self.optimizer, scheduler=self.scheduler,
                               training_state=vars(state))

    def _account_for_skip(self, result: StepResult, state: TrainingState) -> str:
        """Count a skipped step; returns the error message when the run must stop (else "")."""
        if not result.skipped:
            state.consecutive_skips = 0
            return ""
        state.skipped_steps += 1
        if not result.nonfinite:
            return ""  # fp16 loss-scale overflow: the scaler's business, not divergence
        state.consecutive_skips += 1
        if self.rank == 0:
            logger.warning("step %d: %s (loss=%s); update skipped (%d in a row, %d in total)", state.step,
                           result.nonfinite_where, result.loss, state.consecutive_skips, state.skipped_steps)
        if state.consecutive_skips < self.config.train.max_skipped_steps:
            return ""
        return (f"step {state.step}: {result.nonfinite_where} (loss={result.loss}); {state.consecutive_skips} "
                f"consecutive steps skipped for NaN/Inf, stopping (train.max_skipped_steps="
                f"{self.config.train.max_skipped_steps})")

    def _log(self, result: StepResult, state: TrainingState) -> None:
        t = self.config.train
        record = {
            "step": state.step,
            "loss": result.loss,
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "batch_size": t.global_batch_size,
            "step_time_s": result.step_time_s,
            "consumed_samples": state.consumed_samples,
            "skipped_steps": state.skipped_steps,
            "skipped": result.skipped,
            "wall_time": time.time(),  # unix time at the end of the step: diffs give full loop iterations
            **self.throughput.fields(result.step_time_s),
        }
        state.history.append(record)
        if state.step % self.config.log.interval == 0 or state.step == t.steps:
            self.metrics.log(record)
            self.metrics.console(record)
        if self.valid_dataset is not None and t.eval_interval and state.step % t.eval_interval == 0:
            val_loss = evaluate(chunks=self.chunks, dataset=self.valid_dataset, config=self.config,
                                num_micro_batches=self.num_micro_batches, ranks=self.ranks)
            self.metrics.log({"step": state.step, "val_loss": val_loss,
                              "consumed_samples": state.consumed_samples})
            if self.rank == 0:
                print(f" validation loss at iteration {state.step}: lm loss {val_loss:.6E}", flush=True)
