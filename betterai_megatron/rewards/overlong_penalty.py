"""Length penalties (registered by name), added to the reward: pure tensor functions ``[n] lengths -> [n]``.

``"dapo_overlong"``: DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, §3.4, eq. 13). With
``L_max`` the generation limit and ``L_cache`` the length of the punishment interval before it:

    R_length(y) = 0                                  if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                = -1                                 if |y| > L_max

so the penalty grows linearly from 0 to -1 over the last ``L_cache`` tokens instead of punishing a truncated but
otherwise good answer as hard as a wrong one.

``"none"``: zeros.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from betterai_megatron.rewards.registry import Registry

LengthPenalty = Callable[..., torch.Tensor]
LENGTH_PENALTIES: Registry[LengthPenalty] = Registry("length penalty")


@LENGTH_PENALTIES.register("dapo_overlong")
def dapo_overlong_penalty(lengths: torch.Tensor, *, max_length: int, cache_length: int) -> torch.Tensor:
    """``[n]`` response lengths (tokens) -> ``[n]`` penalties in [-1, 0]."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    lengths = lengths.to(torch.float64)
    soft_start = max_length - cache_length
    ramp = (soft_start - lengths) / cache_length
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty).to(torch.float32)


@LENGTH_PENALTIES.register("none")
def no_length_penalty(lengths: torch.Tensor, **_: int) -> torch.Tensor:
    return torch.zeros(lengths.shape, dtype=torch.float32)
