"""Linear-attention token mixers for the ``self_attention`` slot of megatron-core's ``TransformerLayer``:
DeltaNet (``D``), GLA (``L``) and Gated DeltaNet (``G``), built through :func:`linear_attention_spec`.

Names are imported lazily, so that loading a config (which needs only :class:`LinearAttentionConfig`) does not
import torch and megatron-core."""

import importlib

_EXPORTS = {
    "LinearAttentionConfig": "config",
    "DeltaNetMixer": "deltanet",
    "GatedDeltaNetMixer": "gated_deltanet",
    "GLAMixer": "gla",
    "LinearAttentionMixer": "mixer",
    "LinearAttentionSubmodules": "mixer",
    "MIXERS": "spec",
    "linear_attention_spec": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
