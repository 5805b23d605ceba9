"""Optimiser and learning-rate schedule: megatron-core's ``get_megatron_optimizer`` (Adam/SGD, distributed
optimizer, gradient clipping, mixed precision) and ``OptimizerParamScheduler`` (warmup then cosine, linear, WSD,
inverse-square-root or constant decay down to ``min_lr``). Steps are counted in optimiser steps."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.config.train import TrainConfig


def build_optimizer(*, train: TrainConfig, model: ModelConfig, parallel: ParallelConfig, chunks: list):
    config = OptimizerConfig(
        optimizer=train.optimizer,
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=model.params_dtype == "bf16",
        fp16=model.params_dtype == "fp16",
        use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(*, train: TrainConfig, optimizer) -> OptimizerParamScheduler:
    decay_steps = train.lr_decay_steps or max(train.steps, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.lr_warmup_steps else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, train.lr_warmup_steps + 1),
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=train.lr_wsd_decay_steps,
        lr_wsd_decay_style=train.lr_wsd_decay_style,
    )
