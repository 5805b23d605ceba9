"""Kernels: torch reference/chunked kernels that run anywhere (the CPU path, with autograd) and dispatch to fused
GPU kernels when they are installed.

Linear attention (fla 0.6 layout and semantics, interchangeable with ``fla.ops``):
``chunk_delta_rule``, ``chunk_gla``, ``chunk_gated_delta_rule`` (training / prefill) and
``fused_recurrent_delta_rule``, ``fused_recurrent_gla``, ``fused_recurrent_gated_delta_rule`` (token-by-token,
for generation). Backend choice: :mod:`betterai_megatron.kernels._fla_compat`.
"""

from betterai_megatron.kernels.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from betterai_megatron.kernels.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from betterai_megatron.kernels.gla import chunk_gla, fused_recurrent_gla

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
]
