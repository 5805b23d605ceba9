"""Sequence packing: several documents per training sequence, with no attention across their boundaries.

Owns the pure functions that the SFT and preference datasets use:

* :func:`pack_best_fit_decreasing` — assign documents to sequences of a fixed token capacity (best-fit
  decreasing bin packing; a classic ~11/9-optimal heuristic, the same family as NeMo's ``first_fit_decreasing``).
* :func:`build_packed_sample` — one packed sample in megatron-core conventions, from ``(ids, target_mask)``
  documents. Labels are shifted **inside each document** (a document of ``n`` tokens contributes ``n - 1``
  positions), so no label ever crosses a boundary and ``cu_seqlens`` is exact.
* :func:`block_causal_attention_mask` — the boolean ``[1, s, s]`` mask for megatron-core's local
  ``DotProductAttention`` (``True`` = masked: the softmax does ``masked_fill(mask, -10000)``; with a mask given it
  is used instead of the implicit causal one).
* :func:`packed_seq_params` — ``PackedSeqParams`` in the ``thd`` format for Transformer Engine's attention on GPU
  (``cu_seqlens`` are cumulative document starts).

Sample layout (``s`` = ``seq_length``): ``tokens [s]`` int64, ``labels [s]`` int64, ``loss_mask [s]`` float32,
``position_ids [s]`` int64 restarting at 0 in each document, ``cu_seqlens [K]`` int32: the ``k + 1`` boundaries
``0 = c_0 < c_1 < ... < c_k = s`` right-padded with ``-1`` to a width ``K`` fixed per dataset (fixed shapes let the
default ``DataLoader`` collate stack samples and let megatron broadcast a batch across tensor-parallel ranks).
Trailing padding, when present, is one extra segment with ``loss_mask == 0`` (every token belongs to a segment,
as TE's thd kernels require).

Hand-written: megatron-core ships no SFT packing; the functions are small and tested against naive references.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose summed ``lengths`` are at most ``capacity``.

    Best-fit decreasing: items from longest to shortest (ties by index, so the result is deterministic), each into
    the open bin with the least room that still fits it. ``O(n log n)`` with a sorted list of free capacities.
    Returns bins in creation order, each a list of item indices (longest first).
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        length = int(lengths[i])
        if length > capacity or length <= 0:
            raise ValueError(f"item {i} has length {length}, outside (0, {capacity}]")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([i])
            room, index = capacity - length, len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(i)
            room -= length
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


def build_packed_sample(documents: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_length: int, pad_token_id: int,
                        cu_seqlens_width: int | None = None) -> dict[str, torch.Tensor]:
    """Pack documents into one sample of ``seq_length`` positions.

    Args:
        documents: ``(token_ids [n_i], target_mask [n_i])`` pairs; ``target_mask[j] == 1`` means token ``j`` is
            trained on (is a label). Requires ``sum(n_i - 1) <= seq_length`` and every ``n_i >= 2``.
        seq_length: ``s``.
        pad_token_id: id written into padded ``tokens``/``labels`` (its loss is masked).
        cu_seqlens_width: pad ``cu_seqlens`` with ``-1`` to this width (``None``: exactly ``k + 1``).

    Returns:
        ``tokens [s]``, ``labels [s]``, ``loss_mask [s]``, ``position_ids [s]``, ``cu_seqlens [K]``.
    """
    tokens = np.full(seq_length, pad_token_id, dtype=np.int64)
    labels = np.full(seq_length, pad_token_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    cu_seqlens = [0]
    offset = 0
    for ids, mask in documents:
        n = len(ids) - 1
        if n < 1:
            raise ValueError("a packed document needs at least 2 tokens")
        if offset + n > seq_length:
            raise ValueError(f"documents need {offset + n} positions, more than seq_length={seq_length}")
        tokens[offset:offset + n] = ids[:-1]
        labels[offset:offset + n] = ids[1:]
        loss_mask[offset:offset + n] = mask[1:]
        position_ids[offset:offset + n] = np.arange(n)
        offset += n
        cu_seqlens.append(offset)
    if offset < seq_length:  # padding is its own segment
        position_ids[offset:] = np.arange(seq_length - offset)
        cu_seqlens.append(seq_length)
    if cu_seqlens_width is not None:
        if cu_seqlens_width < len(cu_seqlens):
            raise ValueError(f"cu_seqlens needs {len(cu_seqlens)} entries, more than "
                             f"cu_seqlens_width={cu_seqlens_width}")
        cu_seqlens += [-1] * (cu_seqlens_width - len(cu_seqlens))
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[s]`` segment index of each position, from ``cu_seqlens [k + 1]`` (entries ``< 0`` are padding, ignored)."""
    cu = cu_seqlens[cu_seqlens >= 0].to(torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_length:
        raise ValueError(f"cu_seqlens must run from 0 to seq_length={seq_length}, got {cu.tolist()}")
    return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])


def block_causal_attention_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Boolean mask ``[1, s, s]`` (or ``[b, 1, s, s]`` for ``cu_seqlens [b, K]``); ``True`` = may NOT attend.

    Position ``q`` may attend to ``k`` iff ``k <= q`` and both lie in the same segment.
    """
    if cu_seqlens.dim() == 2:
        return torch.stack([block_causal_attention_mask(row, seq_length) for row in cu_seqlens])
    seg = segment_ids(cu_seqlens, seq_length)
    pos = torch.arange(seq_length)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed).unsqueeze(0)


def packed_seq_params(cu_seqlens: torch.Tensor, seq_length: int) -> Any:
    """megatron-core ``PackedSeqParams`` (``qkv_format="thd"``) for a batch ``cu_seqlens [b, K]`` (``-1`` padded).

    The ``b`` packed rows are treated as one stream of ``b * s`` tokens (row ``i`` offset by ``i * s``), which is
    how the thd format sees a flattened micro-batch.
    """
    from megatron.core.packed_seq_params import (
        PackedSeqParams,  # heavy import, only where needed
    )

    if cu_seqlens.dim() == 1:
        cu_seqlens = cu_seqlens.unsqueeze(0)
    pieces = [torch.zeros(1, dtype=torch.int32)]
    for row_index, row in enumerate(cu_seqlens):
        cu = row[row >= 0].to(torch.int32)
        if int(cu[-1]) != seq_length:
            raise ValueError(f"row {row_index}: cu_seqlens must end at seq_length={seq_length}, got {cu.tolist()}")
        pieces.append(cu[1:] + row_index * seq_length)
    cu_all = torch.cat(pieces)
    max_seqlen = int((cu_all[1:] - cu_all[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_all, cu_seqlens_kv=cu_all,
                           cu_seqlens_q_padded=cu_all, cu_seqlens_kv_padded=cu_all,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
