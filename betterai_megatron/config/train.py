"""Training-loop sections: ``train.*`` (steps, batch sizes, optimiser, schedule) and ``checkpoint.*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    steps: int = 10  # optimiser steps
    seed: int = 1234
    micro_batch_size: int = 2  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = 8  # sequences per optimiser step, over all data-parallel ranks
    # batch-size ramp-up as megatron's [start, increment, ramp_samples]; null: none
    rampup_batch_size: Optional[list[int]] = None
    seq_length: int = 64  # tokens per sequence
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine", "WSD", "inverse-square-root"] = "cosine"
    lr_decay_steps: Optional[int] = None  # default: steps
    lr_wsd_decay_steps: Optional[int] = None  # WSD: length of the final decay phase
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: Optional[int] = None  # steps between validation passes; null: none
    eval_iters: int = 2  # global batches per validation pass
    exit_duration_mins: Optional[float] = None  # stop (with a checkpoint) after this much wall time
    max_skipped_steps: int = 5  # consecutive NaN/Inf steps before stopping
    peak_tflops: Optional[float] = None  # per device, for MFU; default by device
    optimizer: Literal["adam", "sgd"] = "adam"


@dataclass
class CheckpointConfig:
    """Checkpoints (betterai_megatron.training.checkpointing). A run resumes from ``dir`` when it holds a
    checkpoint; otherwise from ``load_dir`` when set (e.g. the previous stage); otherwise it starts fresh."""

    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    save_interval: Optional[int] = None  # steps; null: only at the end and on signals
    keep_last: Optional[int] = None  # keep this many newest checkpoints; null: all
    async_save: bool = False  # write in a background process (dist_checkpointing's async path)
    load_weights_only: bool = False  # with load_dir: model weights only (fresh optimiser and schedule, step 0)
    load_dir: Optional[str] = None  # start from here when dir holds no checkpoint (e.g. the previous stage)
    save_on_exit: bool = True  # save when training ends (signals and train.exit_duration_mins always save)
    load_optimizer: bool = True  # false: resume weights, schedule and step with fresh optimiser moments
    # distributed optimizer only: save its state in megatron-core's "fully_reshardable" format (gathered on each
    # data-parallel rank 0 while saving; loads at any tp/pp/ep) instead of "dp_reshardable" (fully parallel
    # save, but reshards across data parallelism only). Megatron-LM: --dist-ckpt-optim-fully-reshardable
    fully_reshardable_optimizer: bool = False
