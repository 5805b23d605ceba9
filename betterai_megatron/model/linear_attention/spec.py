"""``linear_attention_spec(kind)``: the ``ModuleSpec`` that puts a linear-attention mixer in the ``self_attention``
slot of megatron-core's ``TransformerLayer``.

Usage (what the model builder does for each layer whose ``model.layer_pattern`` letter is not ``A``)::

    layer_spec.submodules.self_attention = linear_attention_spec("G", config=LinearAttentionConfig())

The rest of the layer (input norm, residuals, MLP or MoE) is untouched. The mixer reads from megatron-core's
``TransformerConfig``: ``hidden_size``, ``num_attention_heads`` and ``kv_channels`` (head count and sizes unless
``LinearAttentionConfig`` overrides them), ``layernorm_epsilon`` (output norm), ``init_method`` /
``output_layer_init_method``, ``add_bias_linear`` (``out_proj`` bias), ``params_dtype``, ``sequence_parallel``,
``perform_initialization`` and ``context_parallel_size`` (CP: the recurrent state and the convolution halo
cross the CP group, see :mod:`~betterai_megatron.model.linear_attention.mixer`). With Transformer Engine layer
specs, whose ``input_layernorm`` is an ``IdentityOp`` (the norm is fused into ``linear_qkv``), set
``input_layernorm`` to a real norm for linear-attention layers.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from betterai_megatron.model.linear_attention.config import LinearAttentionConfig
from betterai_megatron.model.linear_attention.deltanet import DeltaNetMixer
from betterai_megatron.model.linear_attention.gated_deltanet import GatedDeltaNetMixer
from betterai_megatron.model.linear_attention.gla import GLAMixer
from betterai_megatron.model.linear_attention.mixer import LinearAttentionSubmodules

MIXERS = {"D": DeltaNetMixer, "L": GLAMixer, "G": GatedDeltaNetMixer}


def linear_attention_spec(
    kind: str,
    config: Optional[LinearAttentionConfig] = None,
    *,
    submodules: Optional[LinearAttentionSubmodules] = None,
) -> ModuleSpec:
    """ModuleSpec for the self-attention slot: ``kind`` is ``"D"`` (DeltaNet), ``"L"`` (GLA) or ``"G"`` (Gated
    DeltaNet). ``submodules`` swaps the parallel linears (default megatron-core's Column/RowParallelLinear)."""
    if kind not in MIXERS:
        raise ValueError(f"linear attention kind {kind!r} is not one of {sorted(MIXERS)} "
                         "(D: DeltaNet, L: GLA, G: Gated DeltaNet)")
    config = config or LinearAttentionConfig()
    config.validate()
    return ModuleSpec(
        module=MIXERS[kind],
        submodules=submodules or LinearAttentionSubmodules(),
        params={"linear_config": config},
    )
