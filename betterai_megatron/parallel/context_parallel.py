"""The data side of context parallelism (CP): which tokens each CP rank holds, and slicing a batch to them.

Owns the *load-balanced chunk order* that megatron-core, Transformer Engine and our ring attention
(:mod:`betterai_megatron.kernels.ring_attention`) all assume. A sequence of ``seq_length`` tokens is cut into
``2 * cp_size`` equal chunks; CP rank ``i`` holds chunks ``i`` and ``2 * cp_size - 1 - i``, concatenated in that
order. With a causal mask, late chunks attend to more keys than early ones; pairing an early chunk with a late
one gives every rank the same amount of attention work (the scheme of megatron-core's
``get_batch_on_this_cp_rank`` and TE's ``AttnFuncWithCPAndKVP2P``). Example, ``seq_length=8, cp_size=2``:
rank 0 holds positions ``[0, 1, 6, 7]``, rank 1 holds ``[2, 3, 4, 5]``.

Tensors and their sequence dimension (megatron's batch dict):

* ``tokens``, ``labels``, ``loss_mask``, ``position_ids``: ``[b, s]`` -> ``[b, s / cp]`` (dim 1)
* ``attention_mask``: ``[b, 1, s, s]`` -> ``[b, 1, s / cp, s]`` (dim 2: the query rows; all key columns stay,
  in the original order -- :class:`~betterai_megatron.model.ring_attention.RingDotProductAttention` expects that)

Nothing here initialises process groups (only ``parallel/layout`` does): functions take ``cp_size``/``cp_rank``
or an already-built ``cp_group``. Hand-written because megatron-core's ``get_batch_on_this_cp_rank`` mutates its
argument, needs a live process group and fails with a bare ``view`` error on lengths not divisible by
``2 * cp``; ours is a pure function with a clear error (and is tested against megatron-core's).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Default sequence dimension of each known batch key; any other key falls back to ``default_seq_dim``.
BATCH_SEQ_DIMS: dict[str, int] = {
    "tokens": 1,
    "labels": 1,
    "loss_mask": 1,
    "position_ids": 1,
    "attention_mask": 2,
}


def check_cp_seq_length(*, seq_length: int, cp_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> None:
    """Raise ``ValueError`` unless ``seq_length`` splits into ``2 * cp_size`` equal chunks (times ``tp_size``
    when sequence parallelism also splits each CP rank's tokens across the tensor-parallel group)."""
    if cp_size < 1:
        raise ValueError(f"parallel.cp must be >= 1, got {cp_size}")
    divisor = 2 * cp_size if cp_size > 1 else 1
    if sequence_parallel:
        divisor *= tp_size
    if seq_length % divisor != 0:
        what = f"2 * parallel.cp ({2 * cp_size})" if cp_size > 1 else "1"
        if sequence_parallel and tp_size > 1:
            what += f" * parallel.tp ({tp_size}, sequence parallel)"
        raise ValueError(
            f"seq_length={seq_length} is not divisible by {what} = {divisor}: context parallelism cuts every "
            f"sequence into 2 * cp load-balanced chunks; choose a seq_length that is a multiple of {divisor}"
        )


def load_balanced_chunk_ids(*, cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk ids (of ``2 * cp_size``) CP rank ``cp_rank`` holds: ``(cp_rank, 2 * cp_size - 1 - cp_rank)``."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_token_positions(
    *, seq_length: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions ``[s / cp]`` (int64) of the tokens CP rank ``cp_rank`` holds, in its local order.

    ``cp_size == 1`` gives ``arange(seq_length)``.
    """
    check_cp_seq_length(seq_length=seq_length, cp_size=cp_size)
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    chunk_length = seq_length // (2 * cp_size)
    first, second = load_balanced_chunk_ids(cp_size=cp_size, cp_rank=cp_rank)
    return torch.cat(
        [
            torch.arange(first * chunk_length, (first + 1) * chunk_length, device=device),
            torch.arange(second * chunk_length, (second + 1) * chunk_length, device=device),
        ]
    )


def slice_for_cp_rank(tensor: torch.Tensor, *, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along ``seq_dim`` (length ``s`` -> ``s / cp``), load-balanced order."""
    if cp_size == 1:
        return tensor
    seq_length = tensor.shape[seq_dim]
    index = local_token_positions(seq_length=seq_length, cp_size=cp_size, cp_rank=cp_rank, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def slice_batch_for_cp_rank(
    batch: Mapping[str, torch.Tensor | None],
    *,
    cp_size: int,
    cp_rank: int,
    seq_dims: Mapping[str, int] | None = None,
    default_seq_dim: int = 1,
) -> dict[str, torch.Tensor | None]:
    """A new batch dict with every tensor cut to this CP rank's tokens (``None`` values pass through).

    ``seq_dims`` overrides :data:`BATCH_SEQ_DIMS` per key. The input dict is not modified.
    """
    dims = {**BATCH_SEQ_DIMS, **(seq_dims or {})}
    out: dict[str, torch.Tensor | None] = {}
    for key, value in batch.items():
        if value is None or cp_size == 1:
            out[key] = value
            continue
        seq_dim = dims.get(key, default_seq_dim)
        try:
            out[key] = slice_for_cp_rank(value, seq_dim=seq_dim, cp_size=cp_size, cp_rank=cp_rank)
        except ValueError as err:
            raise ValueError(f"batch[{key!r}] (shape {tuple(value.shape)}, sequence dim {seq_dim}): {err}") from None
    return out


def slice_batch_for_cp_group(
    batch: Mapping[str, torch.Tensor | None], *, cp_group: torch.distributed.ProcessGroup | None, **kwargs
) -> dict[str, torch.Tensor | None]:
    """:func:`slice_batch_for_cp_rank` with size and rank read from ``cp_group`` (``None``: no CP)."""
    if cp_group is None:
        return dict(batch)
    return slice_batch_for_cp_rank(
        batch, cp_size=cp_group.size(), cp_rank=torch.distributed.get_rank(cp_group), **kwargs
    )


def gather_from_cp_ranks(
    local: torch.Tensor, *, seq_dim: int, cp_group: torch.distributed.ProcessGroup | None
) -> torch.Tensor:
    """Inverse of :func:`slice_for_cp_rank`: all-gather every rank's part and restore the original order.

    ``[.., s / cp, ..] -> [.., s, ..]`` on every rank. Not differentiable (for evaluation, logging, tests).
    """
    if cp_group is None or cp_group.size() == 1:
        return local
    cp_size = cp_group.size()
    parts = [torch.empty_like(local) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=cp_group)
    seq_length = local.shape[seq_dim] * cp_size
    full = torch.empty(
        *local.shape[:seq_dim], seq_length, *local.shape[seq_dim + 1 :], dtype=local.dtype, device=local.device
    )
    for rank, part in enumerate(parts):
        index = local_token_positions(seq_length=seq_length, cp_size=cp_size, cp_rank=rank, device=local.device)
        full.index_copy_(seq_dim, index, part)
    return full


def ring_attention_activation_bytes(
    *,
    seq_length: int,
    micro_batch_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    cp_size: int,
    bytes_per_element: int,
) -> int:
    """Estimated bytes one CP rank keeps for the backward of one ring-attention layer (per TP partition: pass
    the per-partition head counts).

    Saved: query, key, value and output of the local ``s / cp`` tokens, plus the fp32 log-sum-exp per query
    head and token; the K/V ring buffers exist only during the layer's forward/backward and are not counted.
    Everything scales as ``1 / cp`` -- the figure ``model-info`` should use for attention with CP.
    """
    local_tokens = seq_length // cp_size * micro_batch_size
    q_and_out = 2 * local_tokens * num_attention_heads * head_dim * bytes_per_element
    k_and_v = 2 * local_tokens * num_query_groups * head_dim * bytes_per_element
    lse = local_tokens * num_attention_heads * 4
    return q_and_out + k_and_v + lse
