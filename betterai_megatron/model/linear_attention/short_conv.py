"""Short causal depthwise convolution with a carried state (the "ShortConv" of DeltaNet and Gated DeltaNet).

Yang et al. 2024 (DeltaNet, arXiv:2406.06484, section 3.3) and Yang et al. 2025 (Gated DeltaNet) put a
depthwise causal convolution of width 4 followed by SiLU on q, k and v; it gives each token a little local
context before the recurrence. The convolution state is the last ``width - 1`` inputs, so a prefill followed
by single-token steps sees exactly what one long call sees. A pure function over tensors; the parameter lives
in the mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
