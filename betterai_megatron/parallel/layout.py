"""The only caller of megatron-core's ``parallel_state`` initialisation.

Turns ``parallel.*`` into megatron-core's process groups (tp, pp, vpp, cp, ep, etp; dp is the remainder) after
:func:`betterai_megatron.config.validate_layout` has checked the layout against the world size, and seeds the
model-parallel RNG tracker as Megatron-LM does (different streams per tp rank inside TP regions, per pp stage).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from betterai_megatron.config.parallel import ParallelConfig


@dataclass(frozen=True)
class LayoutRanks:
    """This process's coordinates in the layout (for logging and data sharding)."""

    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    ep_rank: int
    dp_size: int

    @property
    def is_logging_rank(self) -> bool:
        return torch.distributed.get_rank() == 0


def initialize_parallel(parallel: ParallelConfig, *, seed: int) -> LayoutRanks:
    """Create megatron-core's groups for this layout and seed every RNG for this rank."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.vpp if parallel.vpp and parallel.vpp > 1 else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
    )
    seed_everything(seed)
    return current_ranks()


def seed_everything(seed: int) -> None:
    """Megatron-LM's scheme: a distinct stream per pipeline stage, then per-tp-rank streams for TP regions."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def current_ranks() -> LayoutRanks:
    return LayoutRanks(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
