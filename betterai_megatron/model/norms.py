"""Torch RMSNorm/LayerNorm that work with megatron-core sequence parallelism (no Apex, no TE needed).

megatron-core's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, and MoE with tp > 1 requires
sequence parallelism, so without Apex/TE (every CPU box) MoE+TP could not run. Under sequence parallelism each
TP rank normalises its own slice of the sequence with the *same* weights, so the weight gradients are partial
sums: megatron-core's ``finalize_model_grads`` already all-reduces, over the TP group, the grads of parameters
marked ``sequence_parallel=True`` — exactly what Apex's and TE's norms do. This module only adds that mark.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelTorchNorm:
    """Factory with ``WrappedTorchNorm``'s signature returning ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by torch norms")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported by torch norms")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
