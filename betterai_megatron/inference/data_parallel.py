"""Data-parallel generation: each data-parallel rank serves its share of the prompts; results come back in order.

Prompt ``i`` goes to data-parallel rank ``i % dp_size`` (round-robin keeps the shares within one prompt of each
other and mixes prompt lengths evenly). Every rank of one model replica (its tensor-parallel group) gets the same
share. The per-row random generators are keyed by the *global* prompt index, so the samples are the same for
any dp size. Results are exchanged with ``all_gather_object`` over the data-parallel group (small Python
objects: token lists, log-prob lists, text), so every rank returns the full list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

from .config import SamplingParams
from .engine import GenerationEngine
from .outputs import GenerationResult


def shard_indices(num_prompts: int, *, dp_rank: int, dp_size: int) -> list[int]:
    """The global prompt indices data-parallel rank ``dp_rank`` generates."""
    return list(range(dp_rank, num_prompts, dp_size))


def generate_data_parallel(engine: GenerationEngine, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                           *, dp_group=None) -> list[GenerationResult]:
    """Generate ``prompts`` (the full list, identical on every rank) across the data-parallel group ``dp_group``.

    Returns all results, in prompt order, on every rank. With ``dp_group`` None (or of size 1) this is
    ``engine.generate``.
    """
    dp_size = dist.get_world_size(dp_group) if dp_group is not None and dist.is_initialized() else 1
    if dp_size == 1:
        return engine.generate(prompts, sampling)
    dp_rank = dist.get_rank(dp_group)
    mine = shard_indices(len(prompts), dp_rank=dp_rank, dp_size=dp_size)
    local = engine.generate([prompts[i] for i in mine], sampling, prompt_indices=mine)
    gathered: list[list[GenerationResult] | None] = [None] * dp_size
    dist.all_gather_object(gathered, local, group=dp_group)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for share in gathered:
        for result in share:
            results[result.prompt_index] = result
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"data-parallel generation lost prompts {missing[:10]}")
    return results
