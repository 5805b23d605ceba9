"""Parallel layout section (``parallel.*``). Data parallel size is what remains of the world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages (model chunks) per pp rank: interleaved 1F1B
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel (carved out of data parallel, as in megatron-core)
    etp: Optional[int] = None  # expert tensor parallel; null = tp
    # null: on where megatron-core requires it (MoE with tp > 1), off otherwise
    sequence_parallel: Optional[bool] = None
    distributed_optimizer: bool = False  # ZeRO-1 style sharded optimizer state
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # auto: nccl when CUDA is available, gloo otherwise
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # context-parallel attention: "ring" (ours, any backend, no TE) or "te" (Transformer Engine's, GPU only)
    cp_attention: Literal["ring", "te"] = "ring"
