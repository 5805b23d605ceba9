"""Linear-attention token mixers for the ``self_attention`` slot of megatron-core's ``TransformerLayer``:
DeltaNet (``D``), GLA (``L``) and Gated DeltaNet (``G``), built through :func:`linear_attention_spec`."""

from betterai_megatron.model.linear_attention.config import LinearAttentionConfig
from betterai_megatron.model.linear_attention.deltanet import DeltaNetMixer
from betterai_megatron.model.linear_attention.gated_deltanet import GatedDeltaNetMixer
from betterai_megatron.model.linear_attention.gla import GLAMixer
from betterai_megatron.model.linear_attention.mixer import (
    LinearAttentionMixer,
    LinearAttentionSubmodules,
)
from betterai_megatron.model.linear_attention.spec import MIXERS, linear_attention_spec

__all__ = [
    "DeltaNetMixer",
    "GLAMixer",
    "GatedDeltaNetMixer",
    "LinearAttentionConfig",
    "LinearAttentionMixer",
    "LinearAttentionSubmodules",
    "MIXERS",
    "linear_attention_spec",
]
