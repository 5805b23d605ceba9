"""Model section of the config (``model.*``): architecture choices, presets resolved before typing.

Field names follow megatron-core's ``TransformerConfig`` where one exists; :mod:`betterai_megatron.model.
transformer_config` maps them. ``preset`` names a dict in :mod:`betterai_megatron.model.presets`; fields given
in the file or on the command line win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from betterai_megatron.model.linear_attention.config import LinearAttentionConfig


@dataclass
class MoEConfig:
    """Mixture of experts (``model.moe.*``). ``num_experts: null`` means a dense model."""

    num_experts: Optional[int] = None
    router_topk: int = 2
    ffn_hidden_size: Optional[int] = None  # per expert; defaults to model.ffn_hidden_size
    shared_expert_ffn_hidden_size: Optional[int] = None  # DeepSeek-style always-on shared expert(s)
    layer_freq: Union[int, list[int]] = 1  # 1: every layer is MoE; N: every N-th; list: 1 = MoE, 0 = dense
    # "aux_loss" (Switch/GShard), "seq_aux_loss" (DeepSeek-V2/V3 per-sequence), "none" (e.g. with expert bias)
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 1e-2
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to routing scores, updated by load
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    z_loss_coeff: Optional[float] = None  # router z-loss (ST-MoE)
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    capacity_factor: Optional[float] = None  # null: dropless
    grouped_gemm: bool = False
    router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"


@dataclass
class ModelConfig:
    """Architecture. Sizes are in elements (hidden units, heads); ``seq_length`` lives in ``train``."""

    preset: Optional[str] = None
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # default: 4 * hidden (gelu) or ~8/3 * hidden rounded (swiglu)
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; null = multi-head attention
    kv_channels: Optional[int] = None  # head dim; default hidden / heads
    vocab_size: int = 512  # tokenizer vocabulary; padded up to make_vocab_size_divisible_by
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    add_bias_linear: bool = False
    position_embedding: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    # RoPE/NoPE hybrid: every N-th layer skips RoPE (N-1 RoPE layers then one NoPE layer), or an explicit list of
    # 1-based layer numbers without RoPE. At most one of the two.
    nope_layer_interval: Optional[int] = None
    nope_layers: Optional[list[int]] = None
    qk_layernorm: bool = False
    attention_output_gate: bool = False  # sigmoid gate on the attention output (Qiu et al. 2025, Qwen3-Next)
    # Per-layer token mixer, repeated to num_layers: A softmax attention, D DeltaNet, L GLA, G Gated DeltaNet.
    layer_pattern: Optional[str] = None
    tie_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    # layout_invariant: every weight drawn from a generator seeded by (train.seed, parameter, row), so the same
    # seed gives the same model at any tp/pp/vpp/ep layout; megatron: megatron-core's own initialisation.
    init: Literal["layout_invariant", "megatron"] = "layout_invariant"
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # Transformer Engine only
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    # auto: Transformer Engine layers when TE imports on CUDA, else megatron-core's local (torch) layers
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    moe: MoEConfig = field(default_factory=MoEConfig)
    linear_attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)  # D/L/G layers

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts is not None and self.moe.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":  # keep the parameter count of a 4h GELU MLP, rounded to 64
            return ((int(8 * self.hidden_size / 3) + 63) // 64) * 64
        return 4 * self.hidden_size

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab padded so that every tp size in use divides it. Unlike Megatron-LM (which pads to a multiple of
        ``divisible_by * tp``), the padding does not grow with tp, so a checkpoint and the model's numbers do
        not change with the layout."""
        multiple = self.make_vocab_size_divisible_by
        while multiple % tp:
            multiple += self.make_vocab_size_divisible_by
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def mixer_for_layer(self, layer_number: int) -> str:
        """The token mixer letter of 1-based ``layer_number`` ("A" when no pattern is set)."""
        if not self.layer_pattern:
            return "A"
        return self.layer_pattern[(layer_number - 1) % len(self.layer_pattern)]

    def is_moe_layer(self, layer_number: int) -> bool:
        if not self.is_moe:
            return False
        freq = self.moe.layer_freq
        if isinstance(freq, list):
            return bool(freq[layer_number - 1])
        return (layer_number - 1) % freq == 0
