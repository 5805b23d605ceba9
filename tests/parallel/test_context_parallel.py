"""CP batch slicing against hand-computed index orders (megatron-core parity and the gather round trip run
under torchrun in ``test_context_parallel_dist.py``)."""

from __future__ import annotations

import pytest
import torch

from betterai_megatron.parallel.context_parallel import (
    check_cp_seq_length,
    load_balanced_chunk_ids,
    local_token_positions,
    ring_attention_activation_bytes,
    slice_batch_for_cp_rank,
)

# Written out by hand: 2*cp chunks, rank i holds chunks i and 2cp-1-i.
HAND_ORDERS = {
    (8, 2): {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]},
    (16, 4): {0: [0, 1, 14, 15], 1: [2, 3, 12, 13], 2: [4, 5, 10, 11], 3: [6, 7, 8, 9]},
    (12, 3): {0: [0, 1, 10, 11], 1: [2, 3, 8, 9], 2: [4, 5, 6, 7]},
    (12, 2): {0: [0, 1, 2, 9, 10, 11], 1: [3, 4, 5, 6, 7, 8]},
    (5, 1): {0: [0, 1, 2, 3, 4]},
}


@pytest.mark.parametrize("seq,cp", sorted(HAND_ORDERS))
def test_local_positions_follow_the_load_balanced_order(seq, cp):
    for rank, expected in HAND_ORDERS[(seq, cp)].items():
        assert local_token_positions(seq_length=seq, cp_size=cp, cp_rank=rank).tolist() == expected


def test_chunk_ids():
    assert [load_balanced_chunk_ids(cp_size=4, cp_rank=r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    with pytest.raises(ValueError, match="outside"):
        load_balanced_chunk_ids(cp_size=2, cp_rank=2)


def test_batch_slicing_uses_the_sequence_dim_of_each_key():
    seq, cp, rank, b = 8, 2, 1, 2
    tokens = torch.arange(b * seq).view(b, seq)
    mask = torch.arange(b * seq * seq).view(b, 1, seq, seq)
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": tokens.float(), "position_ids": tokens % seq,
             "attention_mask": mask, "extra": None}  # fmt: skip
    out = slice_batch_for_cp_rank(batch, cp_size=cp, cp_rank=rank)
    order = HAND_ORDERS[(seq, cp)][rank]
    assert out["tokens"].tolist() == [[row * seq + p for p in order] for row in range(b)]
    assert out["labels"].tolist() == [[100 + row * seq + p for p in order] for row in range(b)]
    assert out["position_ids"].tolist() == [order, order]
    assert out["loss_mask"].dtype == torch.float32
    # attention_mask: rows are this rank's queries, every key column stays in original order
    assert out["attention_mask"].shape == (b, 1, 4, seq)
    assert torch.equal(out["attention_mask"][1, 0, 2], mask[1, 0, order[2]])
    assert out["extra"] is None
    assert batch["tokens"] is tokens and batch["tokens"].shape == (b, seq)  # input untouched


def test_cp1_is_identity():
    batch = {"tokens": torch.arange(6).view(1, 6)}
    assert slice_batch_for_cp_rank(batch, cp_size=1, cp_rank=0)["tokens"] is batch["tokens"]


def test_indivisible_lengths_are_refused_with_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"batch\['tokens'\].*not divisible by 2 \* parallel.cp \(4\)"):
        slice_batch_for_cp_rank({"tokens": torch.zeros(1, 10)}, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="parallel.tp"):
        check_cp_seq_length(seq_length=12, cp_size=2, tp_size=2, sequence_parallel=True)
    check_cp_seq_length(seq_length=16, cp_size=2, tp_size=2, sequence_parallel=True)


def test_activation_estimate_falls_as_one_over_cp():
    kwargs = dict(seq_length=8192, micro_batch_size=1, num_attention_heads=8, num_query_groups=2, head_dim=64,
                  bytes_per_element=2)  # fmt: skip
    one = ring_attention_activation_bytes(cp_size=1, **kwargs)
    # q, out: 8192*8*64*2 B each; k, v: 8192*2*64*2 B each; lse: 8192*8*4 B
    assert one == 2 * 8192 * 8 * 64 * 2 + 2 * 8192 * 2 * 64 * 2 + 8192 * 8 * 4
    assert ring_attention_activation_bytes(cp_size=4, **kwargs) * 4 == one


def test_hybrid_patterns_load_with_cp_and_chunks_shorter_than_the_conv_halo_are_refused():
    from betterai_megatron.config import load_config
    from betterai_megatron.config.loader import ConfigError

    base = ["model.preset=tiny", "model.num_layers=4", "parallel.cp=4"]
    for pattern in ("GGGA", "DLGA", "LA"):  # 64 tokens / (2 * 4) = chunks of 8 >= halo of 3
        assert load_config(None, [*base, f"model.layer_pattern={pattern}", "train.seq_length=64"]).parallel.cp == 4
    # 16 / 8 = chunks of 2 < conv_kernel_size - 1 = 3: a chunk's halo would need tokens from two chunks back
    with pytest.raises(ConfigError, match=r"train.seq_length=16 with parallel.cp=4 .*linear_attention.conv_kernel_size - 1 = 3"):
        load_config(None, [*base, "model.layer_pattern=GGGA", "train.seq_length=16"])
    # GLA without its optional short convolution needs no halo
    assert load_config(None, [*base, "model.layer_pattern=LA", "train.seq_length=16"]).train.seq_length == 16
