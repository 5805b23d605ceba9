"""Short causal depthwise convolution with a carried state (the "ShortConv" of DeltaNet and Gated DeltaNet).

Yang et al. 2024 (DeltaNet, arXiv:2406.06484, section 3.3) and Yang et al. 2025 (Gated DeltaNet) put a
depthwise causal convolution of width 4 followed by SiLU on q, k and v; it gives each token a little local
context before the recurrence. The convolution state is the last ``width - 1`` inputs, so a prefill followed
by single-token steps sees exactly what one long call sees. Pure functions over tensors; the parameter lives
in the mixer. With context parallelism (:func:`cp_causal_short_conv`) each of a rank's two load-balanced chunks
is convolved with the ``width - 1`` tokens preceding it in the whole sequence as its state (the halo, fetched by
:func:`betterai_megatron.kernels.cp_linear_attention.cp_previous_tokens`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from betterai_megatron.kernels.cp_linear_attention import cp_previous_tokens


def causal_short_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution followed by SiLU.

    x: ``[B, C, T]``; weight: ``[C, W]`` (tap ``W - 1`` multiplies the current token); state: ``[B, C, W - 1]``,
    the inputs before ``x`` (zeros when None, i.e. the start of a sequence).
    Returns ``y [B, C, T]`` and the new state ``[B, C, W - 1]`` (the last ``W - 1`` inputs seen).
    """
    channels, width = weight.shape
    if state is None:
        state = x.new_zeros(x.shape[0], channels, width - 1)
    extended = torch.cat([state.to(x.dtype), x], dim=-1)  # [B, C, W - 1 + T]
    y = F.conv1d(extended, weight.to(x.dtype)[:, None, :], groups=channels)
    new_state = extended[..., extended.shape[-1] - (width - 1):]
    return F.silu(y), new_state


def cp_causal_short_conv(x: torch.Tensor, weight: torch.Tensor, *, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """:func:`causal_short_conv` of a sequence split over the CP group, from the sequence start.

    x: ``[B, C, T]``, this rank's two chunks of ``T / 2`` tokens (load-balanced order); weight ``[C, W]``.
    Returns ``y [B, C, T]``: exactly this rank's slice of the convolution of the whole sequence.
    """
    halos = cp_previous_tokens(x, count=weight.shape[-1] - 1, cp_group=cp_group)  # [2, B, C, W - 1]
    half = x.shape[-1] // 2
    first, _ = causal_short_conv(x[..., :half], weight, halos[0])
    second, _ = causal_short_conv(x[..., half:], weight, halos[1])
    return torch.cat([first, second], dim=-1)
