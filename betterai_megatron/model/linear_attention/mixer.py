"""Base class of the linear-attention token mixers: the parts DeltaNet, GLA and Gated DeltaNet share.

A mixer sits in the ``self_attention`` slot of megatron-core's ``TransformerLayer`` (built through a
``ModuleSpec``): same constructor arguments as ``SelfAttention`` (``config, submodules, layer_number,
attn_mask_type, cp_comm_type, pg_collection``) and the same call (``hidden_states [s, b, h]`` plus keyword
arguments; returns ``(output [s, b, h], bias)``). Attention masks and rotary embeddings are ignored: the
recurrences are causal by construction and position-free.

What this class owns
* Projections. One ``in_proj`` (a ``ColumnParallelLinear`` by default) whose output is laid out **per key head**
  ``[q | k | v | gate | per-head scalars]``, so splitting its rows evenly over tensor-parallel ranks gives each
  rank whole heads, and the full weight (hence a checkpoint) is the same at every TP size. ``out_proj`` is a
  ``RowParallelLinear``. With sequence parallelism, ``in_proj`` all-gathers the sequence-sharded input and
  ``out_proj`` reduce-scatters the output, as megatron's attention does.
* The short causal convolution on q, k, v (weights ``[channels, width]``, per key head, TP-sharded).
* The output norm and gate: per-head RMSNorm then ``* silu(W_z x)``. The norm weight is kept per head
  (``[value_heads * value_head_dim]``, TP-sharded) rather than shared across heads as in fla; it starts at ones,
  so the function at init is the same, and no cross-rank gradient reduction is needed.
* Generation state. With an ``inference_context`` (megatron's ``StaticInferenceContext`` or any object with
  ``key_value_memory_dict`` and ``sequence_len_offset``), the layer keeps
  ``key_value_memory_dict[layer_number] = (conv_state [W - 1, b, conv_channels], recurrent_state
  [value_heads, b, key_head_dim, value_head_dim])`` (local heads; batch in dim 1 as in megatron's KV cache, so
  ``StaticInferenceContext.swap_key_value_dict`` reorders beams unchanged; fp32 recurrent state).
  ``sequence_len_offset == 0`` starts a fresh sequence (prefill, chunked kernel, stored states);
  a later call continues from the stored states: one token per row runs the recurrent step, more tokens run
  the chunked kernel from the stored state.
* Context parallelism (``context_parallel_size > 1``; group from ``pg_collection.cp``, else megatron's). The
  layer input holds this rank's two load-balanced chunks (``i`` and ``2 cp - 1 - i``, see
  :mod:`betterai_megatron.parallel.context_parallel`). The short convolution of each chunk takes the
  ``width - 1`` tokens that precede it from the rank holding them (a halo), and the recurrence passes chunk
  states across the CP group (per-chunk summaries, a scan, a correction; :mod:`betterai_megatron.kernels.
  cp_linear_attention`), so a CP run computes what one rank computes on the whole sequence, forward and
  backward. Projections, norm and gate are per token and need nothing. Generation with CP is refused.
* ``sharded_state_dict`` for megatron's distributed checkpointing (the directly held parameters are TP-sharded
  along dim 0).

Subclasses define the per-head layout (:meth:`_layout`), the convolved parts, and the recurrence (:meth:`_mix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from betterai_megatron.model.layout_invariant_init import INIT_ATTRIBUTE
from betterai_megatron.model.linear_attention.config import LinearAttentionConfig
from betterai_megatron.model.linear_attention.short_conv import causal_short_conv, cp_causal_short_conv

# Parameters whose constructor initialisation is meaningful (norm scales, conv taps, decay rates): a
# re-initialiser that draws every >= 2-D weight from N(0, std) should skip them.


@dataclass
class LinearAttentionSubmodules:
    """Linear layers of a mixer (swap in Transformer Engine's parallel linears on GPU)."""

    in_proj: Union[ModuleSpec, type] = ColumnParallelLinear
    out_proj: Union[ModuleSpec, type] = RowParallelLinear


class LinearAttentionMixer(MegatronModule):
    """Shared machinery; see the module docstring. ``linear_config`` comes from the spec's params."""

    #: names of the per-head parts that go through the short convolution (empty: no convolution)
    conv_parts: tuple[str, ...] = ("q", "k", "v")
    #: whether this mixer supports more value heads than key heads
    grouped_values: bool = False

    def __init__(
        self,
        config: TransformerConfig,
        submodules: LinearAttentionSubmodules,
        layer_number: int,
        attn_mask_type=None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        linear_config: Optional[LinearAttentionConfig] = None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.linear_config = linear_config = linear_config or LinearAttentionConfig()
        linear_config.validate()
        self.tp_group = (
            pg_collection.tp
            if pg_collection is not None and hasattr(pg_collection, "tp")
            else parallel_state.get_tensor_model_parallel_group()
        )
        self.tp_size = self.tp_group.size()
        self.cp_group = self._context_parallel_group(config, pg_collection)
        self._resolve_sizes(config, linear_config)

        self.group_layout = self._layout()  # [(name, width)] per key head
        self.group_width = sum(width for _, width in self.group_layout)
        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            self.num_key_heads * self.group_width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        widths = dict(self.group_layout)
        self.conv_group_width = sum(widths[name] for name in self.conv_parts)
        self._tp_sharded_names: list[str] = []
        if self.conv_parts:
            bound = 1.0 / math.sqrt(linear_config.conv_kernel_size)
            self._local_parameter("conv_weight", self.local_key_heads * self.conv_group_width,
                                  linear_config.conv_kernel_size, init=lambda u: (2.0 * u - 1.0) * bound)
        self._local_parameter("out_norm_weight", self.local_value_heads * self.value_head_dim)
        self._build_extra(config, linear_config)
        self.out_proj = build_module(
            submodules.out_proj,
            self.num_value_heads * self.value_head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ construction helpers
    def _resolve_sizes(self, config: TransformerConfig, lc: LinearAttentionConfig) -> None:
        name = f"{type(self).__name__} (layer {self.layer_number})"
        self.num_key_heads = lc.num_heads or config.num_attention_heads
        self.num_value_heads = lc.num_value_heads or self.num_key_heads
        self.key_head_dim = lc.key_head_dim or config.kv_channels
        self.value_head_dim = lc.value_head_dim or config.kv_channels
        if self.num_value_heads != self.num_key_heads and not self.grouped_values:
            raise ValueError(f"{name}: model.linear_attention.num_value_heads must equal num_heads for this mixer")
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"{name}: num_value_heads ({self.num_value_heads}) must be a multiple of num_heads "
                             f"({self.num_key_heads})")
        if self.num_key_heads % self.tp_size:
            raise ValueError(f"{name}: {self.num_key_heads} linear-attention heads cannot be split over "
                             f"tensor_model_parallel_size={self.tp_size}")
        self.values_per_key = self.num_value_heads // self.num_key_heads
        self.local_key_heads = self.num_key_heads // self.tp_size
        self.local_value_heads = self.num_value_heads // self.tp_size

    def _context_parallel_group(self, config: TransformerConfig, pg_collection):
        """The CP group (``pg_collection.cp``, else megatron's), or None without context parallelism."""
        if config.context_parallel_size == 1:
            return None
        group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        group = group if group is not None else parallel_state.get_context_parallel_group(check_initialized=False)
        if group is None or group.size() != config.context_parallel_size:
            raise ValueError(
                f"{type(self).__name__} (layer {self.layer_number}): context_parallel_size="
                f"{config.context_parallel_size} but the CP process group has "
                f"{'no members' if group is None else group.size()} ranks"
            )
        return group

    def _local_parameter(self, name: str, *shape: int, init=None) -> torch.nn.Parameter:
        """Register ``name``: a TP-sharded (dim 0) parameter held by this module, set in reset_parameters;
        ``init`` (U(0,1) draws -> values) is its distribution for the layout-invariant initialiser."""
        param = torch.nn.Parameter(torch.empty(*shape, dtype=self.config.params_dtype,
                                               device=torch.cuda.current_device()))
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        if init is not None:
            setattr(param, INIT_ATTRIBUTE, init)
        self.register_parameter(name, param)
        self._tp_sharded_names.append(name)
        return param

    def reset_parameters(self) -> None:
        """Norm scale 1; conv taps U(+-1/sqrt(width)) (torch's Conv1d default, as fla's ShortConvolution)."""
        with torch.no_grad():
            self.out_norm_weight.fill_(1.0)
            if self.conv_parts and self.config.perform_initialization:
                bound = 1.0 / math.sqrt(self.linear_config.conv_kernel_size)
                with get_cuda_rng_tracker().fork():
                    self.conv_weight.uniform_(-bound, bound)
            self._reset_extra()

    def _layout(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def _build_extra(self, config: TransformerConfig, lc: LinearAttentionConfig) -> None:
        """Subclass hook: extra parameters/modules."""

    def _reset_extra(self) -> None:
        """Subclass hook: initialise extra parameters (inside ``torch.no_grad``)."""

    def _mix(self, parts: dict, hidden_states: torch.Tensor, *, initial_state, step: bool, output_final_state: bool):
        """Subclass hook: the recurrence. parts: name -> ``[b, s, local_key_heads, width]``.
        Returns ``o [b, s, local_value_heads, value_head_dim]`` and the final state (or None). With context
        parallelism (``self.cp_group`` set) ``s`` is this rank's two load-balanced chunks and the hook runs the
        CP kernel of :mod:`betterai_megatron.kernels.cp_linear_attention` (final state None)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states: Optional[torch.Tensor] = None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        **kwargs,
    ):
        """hidden_states ``[s, b, h]`` (``[s / tp, b, h]`` with sequence parallelism) -> ``(output, bias)``."""
        inference_context = inference_context if inference_context is not None else inference_params
        if packed_seq_params is not None:
            raise NotImplementedError(f"{type(self).__name__}: packed sequences (THD) are not supported")
        if key_value_states is not None:
            raise ValueError(f"{type(self).__name__} is a self-attention mixer; key_value_states must be None")
        if self.cp_group is not None and inference_context is not None:
            raise NotImplementedError(f"{type(self).__name__} (layer {self.layer_number}): generation with "
                                      "context parallelism is not supported")
        projected, _ = self.in_proj(hidden_states)  # [s, b, local_key_heads * group_width]
        seq, batch = projected.shape[:2]
        grouped = projected.transpose(0, 1).reshape(batch, seq, self.local_key_heads, self.group_width)
        parts = dict(zip((n for n, _ in self.group_layout),
                         grouped.split([w for _, w in self.group_layout], dim=-1)))
        conv_state, recurrent_state, continuing = self._read_state(inference_context, batch)
        if self.conv_parts:
            parts, conv_state = self._convolve(parts, conv_state)
        o, final_state = self._mix(
            parts, hidden_states, initial_state=recurrent_state, step=continuing and seq == 1,
            output_final_state=inference_context is not None,
        )
        if inference_context is not None:
            self._write_state(inference_context, conv_state, final_state, batch)
        o = self._norm_and_gate(o, parts.get("z"))
        o = o.reshape(batch, seq, -1).transpose(0, 1).contiguous()  # [s, b, local_value_heads * dv]
        return self.out_proj(o)

    def _convolve(self, parts: dict, state):
        """Short conv + SiLU over the concatenated per-head [q | k | v] channels (with CP: each local chunk
        convolved after the tokens that precede it in the whole sequence)."""
        names = self.conv_parts
        joined = torch.cat([parts[n] for n in names], dim=-1)  # [b, s, G, conv_group_width]
        batch, seq = joined.shape[:2]
        channels_first = joined.reshape(batch, seq, -1).transpose(1, 2)
        if self.cp_group is None:
            mixed, new_state = causal_short_conv(channels_first, self.conv_weight, state)
        else:
            mixed, new_state = cp_causal_short_conv(channels_first, self.conv_weight, cp_group=self.cp_group), None
        mixed = mixed.transpose(1, 2).reshape(joined.shape)
        widths = dict(self.group_layout)
        parts = dict(parts)
        parts.update(zip(names, mixed.split([widths[n] for n in names], dim=-1)))
        return parts, new_state

    def _norm_and_gate(self, o: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-head RMSNorm (fp32) then ``* silu(gate)``. o: ``[b, s, Hv, dv]``; gate ``[b, s, G, r * dv]``."""
        dtype = o.dtype
        x = o.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.layernorm_epsilon)
        x = x * self.out_norm_weight.float().view(self.local_value_heads, self.value_head_dim)
        if gate is not None:
            x = x * F.silu(gate.float().reshape(x.shape))
        return x.to(dtype)

    # ------------------------------------------------------------------ generation state
    def _read_state(self, context, batch: int):
        """(conv_state [b, C, W-1] | None, recurrent_state [b, Hv, K, V] | None, continuing)."""
        if context is None:
            return None, None, False
        name = f"{type(self).__name__} (layer {self.layer_number})"
        if self.config.sequence_parallel:
            raise NotImplementedError(f"{name}: generation with sequence parallelism is not supported")
        if hasattr(context, "is_static_batching") and not context.is_static_batching():
            raise NotImplementedError(f"{name}: only static batching (StaticInferenceContext) is supported")
        if getattr(context, "batch_size_offset", 0):
            raise NotImplementedError(f"{name}: batch_size_offset > 0 is not supported")
        if context.sequence_len_offset == 0:
            return None, None, False
        stored = context.key_value_memory_dict.get(self.layer_number)
        if stored is None:
            raise RuntimeError(
                f"{name}: no stored state at sequence_len_offset={context.sequence_len_offset}; run the prompt "
                "first with sequence_len_offset=0"
            )
        conv_state, recurrent_state = stored
        if recurrent_state.shape[1] != batch:
            raise ValueError(f"{name}: stored state has batch {recurrent_state.shape[1]}, input has {batch}")
        conv = conv_state.permute(1, 2, 0) if self.conv_parts else None
        return conv, recurrent_state.transpose(0, 1), True

    def _write_state(self, context, conv_state, recurrent_state, batch: int) -> None:
        if self.conv_parts:
            conv = conv_state.permute(2, 0, 1).detach()
        else:
            conv = recurrent_state.new_zeros(0, batch, 0)
        context.key_value_memory_dict[self.layer_number] = (conv, recurrent_state.transpose(0, 1).detach())

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Directly held parameters are TP-sharded along dim 0; children shard themselves."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        result = make_sharded_tensors_for_checkpoint(
            own, prefix, {name: 0 for name in self._tp_sharded_names}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            result.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=self.tp_group))
        return result
