"""Settings of the linear-attention token mixers (proposed YAML section ``model.linear_attention.*``).

Head counts and sizes default to the softmax-attention ones of the same model (``num_attention_heads``,
``kv_channels`` of megatron-core's ``TransformerConfig``), so a hybrid layer pattern needs no extra settings.
megatron-core's own ``TransformerConfig.linear_*`` fields (defaults sized for Qwen3-Next) belong to its
fla-only ``GatedDeltaNet`` and are not read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LinearAttentionConfig:
    """Per-model settings shared by the DeltaNet (D), GLA (L) and Gated DeltaNet (G) mixers."""

    num_heads: Optional[int] = None  # query/key heads; default TransformerConfig.num_attention_heads
    # value heads (Gated DeltaNet only, grouped-value attention as in Qwen3-Next); default num_heads
    num_value_heads: Optional[int] = None
    key_head_dim: Optional[int] = None  # default TransformerConfig.kv_channels
    value_head_dim: Optional[int] = None  # default TransformerConfig.kv_channels
    conv_kernel_size: int = 4  # short causal depthwise convolution on q, k, v (DeltaNet, Gated DeltaNet)
    gla_short_conv: bool = False  # the GLA paper has no short convolution
    gla_gate_low_rank_dim: int = 16  # GLA's forget gate is low-rank: hidden -> 16 -> heads * key_head_dim
    gla_gate_normalizer: float = 16.0  # GLA's temperature: log decay = logsigmoid(x) / 16
    output_gate: bool = True  # o = norm(o) * silu(W_z x)
    gdn_a_init_range: tuple[float, float] = (1.0, 16.0)  # Mamba2-style decay rate A ~ U(range)
    gdn_dt_init_range: tuple[float, float] = (1e-3, 1e-1)  # Mamba2-style time step, log-uniform
    chunk_size: int = 64  # chunk length of the torch kernels (fla's kernels choose their own)

    def validate(self, *, where: str = "model.linear_attention") -> None:
        """Raise ValueError naming the offending key."""
        for key in ("num_heads", "num_value_heads", "key_head_dim", "value_head_dim"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{key}={value}: must be a positive integer or null")
        if self.conv_kernel_size < 2:
            raise ValueError(f"{where}.conv_kernel_size={self.conv_kernel_size}: must be at least 2")
        if self.gla_gate_low_rank_dim < 1 or self.gla_gate_normalizer <= 0:
            raise ValueError(f"{where}.gla_gate_*: low-rank dim must be >= 1 and the normalizer > 0")
        if self.chunk_size < 1:
            raise ValueError(f"{where}.chunk_size={self.chunk_size}: must be positive")
        low, high = self.gdn_a_init_range
        if not 0 < low <= high:
            raise ValueError(f"{where}.gdn_a_init_range={self.gdn_a_init_range}: need 0 < low <= high")
        low, high = self.gdn_dt_init_range
        if not 0 < low <= high:
            raise ValueError(f"{where}.gdn_dt_init_range={self.gdn_dt_init_range}: need 0 < low <= high")
