"""``RingDotProductAttention``: megatron-core core attention with context parallelism, without Transformer Engine.

Owns the adapter between megatron-core's ``SelfAttention`` and :func:`betterai_megatron.kernels.ring_attention.
ring_attention`. It fills the ``core_attention`` slot of a layer spec, with the constructor and forward signature
of megatron-core's local ``DotProductAttention`` (``megatron/core/transformer/dot_product_attention.py``), which
refuses ``context_parallel_size > 1``::

    spec.submodules.self_attention.submodules.core_attention = RingDotProductAttention

Shapes: ``query [s, b, np, hn]``, ``key``/``value [s, b, ng, hn]`` (``s`` = this CP rank's tokens in the
load-balanced order, per-TP-partition heads) -> ``[s, b, np * hn]``. With ``cp = 1`` it computes what
``DotProductAttention`` computes (without attention dropout, see below).

The CP group comes from ``pg_collection.cp`` when a collection is passed (megatron-core's ``Attention`` always
passes one), else from ``parallel_state``. The attention mask is treated like the local path treats it:

* causal types (``causal``, ``padding_causal``, ``causal_bottom_right``, equal for self-attention) with no mask:
  causal attention, no mask tensor is built.
* a given bool mask (True = masked) is applied; its rows may be this rank's queries (``[b, 1, s, s * cp]``, as
  megatron-core's ``get_batch_on_this_cp_rank`` and :mod:`betterai_megatron.parallel.context_parallel` slice
  it) or the whole sequence (``[b, 1, s * cp, s * cp]``; this rank's rows are picked). With a causal type it is
  combined with the causal mask (megatron's local path uses the given mask alone; the two agree for every mask
  that contains the causal one, e.g. megatron's left-to-right masks with document resets). A mask equal to the
  plain causal mask is dropped, so the fused, score-free CPU kernel still runs.

Not supported (clear errors at construction): attention dropout (ring attention would have to regenerate the
dropout mask of every block in the backward; modern LLM recipes train with ``attention_dropout=0``), sliding
windows, ``softmax_type`` other than ``vanilla``, packed sequences (``thd``), attention bias, and
``cp_comm_type`` other than ``p2p``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from betterai_megatron.kernels.ring_attention import RingCommStats, ring_attention
from betterai_megatron.parallel.context_parallel import local_token_positions

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)


class RingDotProductAttention(MegatronModule):
    """Core attention over the whole CP group by ring attention (no parameters)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        if not hasattr(pg_collection, "tp"):
            raise ValueError("RingDotProductAttention: pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)

        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)

        # megatron divides the scale by layer_number under apply_query_key_layer_scaling and multiplies it back
        # inside the fp32 softmax; the product is the plain scale, which is what the fp32 ring applies.
        self.softmax_scale = (
            self.hidden_size_per_attention_head**-0.5 if softmax_scale is None else float(softmax_scale)
        )
        self._check_supported(config, layer_number, attention_dropout, cp_comm_type)
        self.backend = "auto"
        self.comm_stats: RingCommStats | None = None  # set to a RingCommStats to time the ring (benchmarks)

    def _check_supported(self, config, layer_number, attention_dropout, cp_comm_type) -> None:
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if dropout:
            problems.append(f"attention_dropout={dropout} (set model.attention_dropout: 0.0)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            problems.append(f"sliding-window attention (window_size={config.window_size})")
        if config.softmax_type != "vanilla":
            problems.append(f"softmax_type={config.softmax_type!r}")
        if cp_comm_type not in (None, "p2p"):
            problems.append(f"cp_comm_type={cp_comm_type!r} (ring attention is 'p2p')")
        if problems:
            raise ValueError(
                f"RingDotProductAttention (layer {layer_number}) does not support: " + "; ".join(problems)
            )

    def _cp_size_and_rank(self) -> tuple[int, int]:
        if self.cp_group is None or not torch.distributed.is_initialized():
            return 1, 0
        return self.cp_group.size(), torch.distributed.get_rank(self.cp_group)

    def _local_mask(self, attention_mask: torch.Tensor | None, *, causal: bool, s_local: int):
        """Bool mask ``[b, 1 | np, s_local, s_full]`` for the kernel, or None (see the module docstring)."""
        if attention_mask is None:
            return None
        cp_size, cp_rank = self._cp_size_and_rank()
        s_full = s_local * cp_size
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > 0.5
        if mask.dim() != 4 or mask.shape[-1] != s_full or mask.shape[-2] not in (s_local, s_full):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not fit {s_local} local tokens x cp="
                f"{cp_size}: expected [b, 1, {s_local}, {s_full}] (rows sliced per CP rank) or "
                f"[b, 1, {s_full}, {s_full}]"
            )
        rows = local_token_positions(seq_length=s_full, cp_size=cp_size, cp_rank=cp_rank, device=mask.device)
        if cp_size > 1 and mask.shape[-2] == s_full:
            mask = mask.index_select(2, rows)
        if causal:
            keys = torch.arange(s_full, device=mask.device)
            plain_causal = keys.unsqueeze(0) > rows.unsqueeze(1)  # [s_local, s_full]
            if bool(torch.equal(mask, plain_causal.expand_as(mask))):
                return None
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``[s, b, np, hn]`` x ``[s, b, ng, hn]`` x ``[s, b, ng, hn]`` -> ``[s, b, np * hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("RingDotProductAttention does not support packed sequences (thd)")
        if attention_bias is not None:
            raise NotImplementedError("RingDotProductAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL_TYPES
        mask = self._local_mask(attention_mask, causal=causal, s_local=query.shape[0])
        context = ring_attention(
            query,
            key,
            value,
            cp_group=self.cp_group,
            causal=causal,
            softmax_scale=self.softmax_scale,
            attention_mask=mask,
            backend=self.backend,
            stats=self.comm_stats,
        )
        return context.view(context.shape[0], context.shape[1], self.hidden_size_per_partition)
