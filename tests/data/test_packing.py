"""Packing: bin assignment, packed sample layout, no attention across documents, thd parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from betterai_megatron.data.packing import (
    block_causal_attention_mask,
    build_packed_sample,
    pack_best_fit_decreasing,
    packed_seq_params,
    segment_ids,
)


def naive_best_fit_decreasing(lengths, capacity):
    """Textbook best-fit decreasing with a linear scan over bins (the reference)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        fitting = [(room[b], b) for b in range(len(bins)) if room[b] >= lengths[i]]
        if fitting:
            _, b = min(fitting)
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_matches_the_naive_reference(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 65, size=300).tolist()
    bins = pack_best_fit_decreasing(lengths, 64)
    assert bins == naive_best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) >= -(-sum(lengths) // 64)  # the lower bound


def test_best_fit_decreasing_rejects_items_that_do_not_fit():
    with pytest.raises(ValueError, match="item 1 has length 9"):
        pack_best_fit_decreasing([3, 9], 8)


def test_packed_sample_layout_by_hand():
    doc_a = (np.array([11, 12, 13]), np.array([0, 1, 1], dtype=np.float32))
    doc_b = (np.array([21, 22]), np.array([0, 1], dtype=np.float32))
    sample = build_packed_sample([doc_a, doc_b], seq_length=6, pad_token_id=0, cu_seqlens_width=5)
    assert sample["tokens"].tolist() == [11, 12, 21, 0, 0, 0]
    assert sample["labels"].tolist() == [12, 13, 22, 0, 0, 0]
    assert sample["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    assert sample["position_ids"].tolist() == [0, 1, 0, 0, 1, 2]
    assert sample["cu_seqlens"].tolist() == [0, 2, 3, 6, -1]
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32


def test_packed_sample_that_fills_the_sequence_has_no_padding_segment():
    docs = [(np.arange(1, 5), np.ones(4, dtype=np.float32)), (np.arange(5, 8), np.ones(3, dtype=np.float32))]
    sample = build_packed_sample(docs, seq_length=5, pad_token_id=0)
    assert sample["cu_seqlens"].tolist() == [0, 3, 5]
    assert sample["position_ids"].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="more than seq_length=4"):
        build_packed_sample(docs, seq_length=4, pad_token_id=0)


def test_block_causal_mask_matches_a_naive_loop():
    cu = torch.tensor([0, 3, 4, 8, -1, -1], dtype=torch.int32)
    mask = block_causal_attention_mask(cu, 8)
    docs = [0, 0, 0, 1, 2, 2, 2, 2]
    expected = torch.tensor([[not (docs[q] == docs[k] and k <= q) for k in range(8)] for q in range(8)])
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[0], expected)
    batched = block_causal_attention_mask(torch.stack([cu, torch.tensor([0, 8, -1, -1, -1, -1], dtype=torch.int32)]), 8)
    assert batched.shape == (2, 1, 8, 8)
    assert torch.equal(batched[1, 0], ~torch.tril(torch.ones(8, 8, dtype=torch.bool)))
    assert segment_ids(cu, 8).tolist() == docs


def test_no_attention_across_packed_documents():
    """Attention over a packed sequence with the block mask (megatron-core's own masking function, True =
    masked) equals attention over each document alone: nothing leaks across a boundary."""
    from megatron.core.transformer.utils import attention_mask_func

    torch.manual_seed(0)
    lengths, s, h = [5, 3, 6], 16, 8
    cu = torch.tensor([0, 5, 8, 14, 16], dtype=torch.int32)
    q, k, v = (torch.randn(s, h) for _ in range(3))

    def attend(q, k, v, mask):
        scores = attention_mask_func((q @ k.T / h ** 0.5).unsqueeze(0), mask)
        return torch.softmax(scores, dim=-1)[0] @ v

    packed = attend(q, k, v, block_causal_attention_mask(cu, s))
    start = 0
    for n in lengths:
        alone = attend(q[start:start + n], k[start:start + n], v[start:start + n],
                       ~torch.tril(torch.ones(1, n, n, dtype=torch.bool)))
        torch.testing.assert_close(packed[start:start + n], alone)
        start += n
    # and the mask really matters: a causal-only mask lets document 2 see document 1
    leaky = attend(q, k, v, ~torch.tril(torch.ones(1, s, s, dtype=torch.bool)))
    assert not torch.allclose(leaky[5:8], packed[5:8])


def test_packed_seq_params_flattens_the_batch():
    cu = torch.tensor([[0, 2, 3, 6, -1], [0, 6, -1, -1, -1]], dtype=torch.int32)
    params = packed_seq_params(cu, 6)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 3, 6, 12]
    assert params.cu_seqlens_kv.tolist() == [0, 2, 3, 6, 12]
    assert params.max_seqlen_q == 6 and params.cu_seqlens_q.dtype == torch.int32
    with pytest.raises(ValueError, match="must end at seq_length=6"):
        packed_seq_params(torch.tensor([0, 2, 5], dtype=torch.int32), 6)
