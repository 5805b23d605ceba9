"""Per-layer ``ModuleSpec``s for the decoder: the architecture is chosen here, never by subclassing the model.

Starts from megatron-core's own per-layer specs (``get_gpt_decoder_layer_specs``: local torch layers, or
Transformer Engine layers), then, per layer:

* swaps megatron-core's ``WrappedTorchNorm`` for :class:`~.norms.SequenceParallelTorchNorm` (SP without Apex/TE);
* puts a linear-attention token mixer in the ``self_attention`` slot where ``model.layer_pattern`` says so;
* puts ring attention in the ``core_attention`` slot when context parallelism runs on the local path;

and finally slices the list to the layers this pipeline stage (and virtual stage) builds.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.model.norms import SequenceParallelTorchNorm


def _replace_modules(obj, old, new):
    """Return a copy of a spec tree with every reference to module ``old`` replaced by ``new``."""
    if obj is old:
        return new
    if isinstance(obj, ModuleSpec):
        return dataclasses.replace(
            obj,
            module=_replace_modules(obj.module, old, new),
            submodules=_replace_modules(obj.submodules, old, new),
        )
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _replace_modules(getattr(obj, f.name), old, new) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_modules(v, old, new) for v in obj)
    return obj


def _with_ring_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    from betterai_megatron.model.ring_attention import RingDotProductAttention

    spec = copy.deepcopy(layer_spec)
    attn = spec.submodules.self_attention
    attn.submodules = dataclasses.replace(attn.submodules, core_attention=RingDotProductAttention)
    return spec


def _with_linear_mixer(layer_spec: ModuleSpec, kind: str, model: ModelConfig, use_transformer_engine: bool
                       ) -> ModuleSpec:
    from betterai_megatron.model.linear_attention import linear_attention_spec

    spec = copy.deepcopy(layer_spec)
    changes = {"self_attention": linear_attention_spec(kind, model.linear_attention)}
    if use_transformer_engine:
        # TE fuses the input norm into linear_qkv (input_layernorm is IdentityOp); a mixer needs a real norm.
        from megatron.core.extensions.transformer_engine import TENorm

        changes["input_layernorm"] = TENorm
    spec.submodules = dataclasses.replace(spec.submodules, **changes)
    return spec


def decoder_layer_specs(
    *, model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig, use_transformer_engine: bool
) -> list[ModuleSpec]:
    """One spec per decoder layer of the whole model (not yet sliced for pipeline stages)."""
    specs = list(
        get_gpt_decoder_layer_specs(config, use_transformer_engine, normalization=model.normalization)
    )
    out = []
    for index, spec in enumerate(specs):
        layer_number = index + 1
        if not use_transformer_engine:
            spec = _replace_modules(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
        mixer = model.mixer_for_layer(layer_number)
        if mixer != "A":
            spec = _with_linear_mixer(spec, mixer, model, use_transformer_engine)
        elif parallel.cp > 1 and parallel.cp_attention == "ring":
            spec = _with_ring_attention(spec)
        out.append(spec)
    return out


def decoder_block_spec(
    *,
    model: ModelConfig,
    parallel: ParallelConfig,
    config: TransformerConfig,
    use_transformer_engine: bool,
    vp_stage: int | None,
) -> TransformerBlockSubmodules:
    """The block spec for this pipeline rank's (virtual) stage."""
    specs = decoder_layer_specs(
        model=model, parallel=parallel, config=config, use_transformer_engine=use_transformer_engine
    )
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm)
