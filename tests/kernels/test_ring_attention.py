"""Single-process tests of the ring-attention math: the causal block plan, the online-softmax merge, and the
kernel at cp=1 -- each against a naive reference written here. The multi-rank ring is tested in
``test_ring_attention_dist.py``."""

from __future__ import annotations

import pytest
import torch

from betterai_megatron.kernels.ring_attention import (
    block_plan,
    merge_partial_attention,
    resolve_backend,
    ring_attention,
)


def _positions(rank: int, cp: int, seq: int) -> list[int]:
    chunk = seq // (2 * cp)
    return list(range(rank * chunk, (rank + 1) * chunk)) + list(
        range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    )


def _naive(q, k, v, *, causal, scale, mask=None):
    """``[s, b, h, d]`` softmax attention with GQA by repeat_interleave, fp64 in, fp64 out."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)


def _rel(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_causal_block_plan_covers_the_causal_mask_exactly_once(cp_size):
    seq = 4 * cp_size
    for rank in range(cp_size):
        q_pos = torch.tensor(_positions(rank, cp_size, seq))
        covered = torch.zeros(len(q_pos), seq, dtype=torch.long)
        for step in range(cp_size):
            source = (rank - step) % cp_size
            k_pos = torch.tensor(_positions(source, cp_size, seq))
            plan = block_plan(cp_rank=rank, cp_size=cp_size, step=step, local_seq_length=len(q_pos), causal=True)
            rows, cols = q_pos[plan.q_rows], k_pos[plan.kv_rows]
            visible = torch.ones(len(rows), len(cols), dtype=torch.long)
            if plan.causal:
                visible = visible.tril()
            covered[torch.arange(len(q_pos))[plan.q_rows].unsqueeze(1), cols.unsqueeze(0)] += visible
            # inside a block the kernel's mask (top-left causal or none) must agree with global positions
            assert torch.equal(visible.bool(), cols.unsqueeze(0) <= rows.unsqueeze(1)), (rank, step)
        expected = (torch.arange(seq).unsqueeze(0) <= q_pos.unsqueeze(1)).long()
        assert torch.equal(covered, expected), f"rank {rank}: coverage differs from the causal mask"


@pytest.mark.parametrize("cp_size", [2, 4])
def test_causal_block_plan_balances_work_across_steps(cp_size):
    local = 8
    for rank in range(cp_size):
        for step in range(1, cp_size):
            plan = block_plan(cp_rank=rank, cp_size=cp_size, step=step, local_seq_length=local, causal=True)
            rows = len(range(local)[plan.q_rows])
            cols = len(range(local)[plan.kv_rows])
            assert rows * cols == local * local // 2 and not plan.causal


def test_noncausal_plan_is_everything():
    plan = block_plan(cp_rank=1, cp_size=4, step=2, local_seq_length=6, causal=False)
    assert (plan.q_rows, plan.kv_rows, plan.causal) == (slice(0, 6), slice(0, 6), False)


def test_merge_of_two_key_blocks_equals_softmax_over_all_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    scores = q @ k.transpose(-1, -2)
    expected = scores.softmax(-1) @ v
    out = torch.zeros(2, 5, 4, dtype=torch.float64)
    lse = torch.full((2, 5), float("-inf"), dtype=torch.float64)
    for cols in (slice(0, 4), slice(4, 9)):
        block = scores[..., cols]
        merge_partial_attention(out, lse, block.softmax(-1) @ v[:, cols], torch.logsumexp(block, -1))
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2), (4, 1)])
def test_single_rank_matches_naive_attention_and_gradients(backend, causal, heads, groups):
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    q, dout = (torch.randn(12, 2, heads, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(12, 2, groups, 8, generator=gen) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=causal, backend=backend)  # default scale 1/sqrt(8)
    out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _naive(*ref_leaves, causal=causal, scale=8**-0.5)
    ref.backward(dout.double())
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert _rel(out, ref) < 1e-5
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert _rel(leaf.grad, ref_leaf.grad) < 1e-5


def test_explicit_mask_is_applied_on_top_of_causal():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 1, 2, 4, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 3:, :3] = True  # a second document starts at position 3
    out = ring_attention(q, k, v, causal=True, softmax_scale=0.5, attention_mask=mask)
    ref = _naive(q.double(), k.double(), v.double(), causal=True, scale=0.5, mask=mask)
    assert _rel(out, ref) < 1e-5
    # the second document's output does not depend on the first document's values
    v2 = v.clone()
    v2[:3] += 100.0
    out2 = ring_attention(q, k, v2, causal=True, softmax_scale=0.5, attention_mask=mask)
    assert torch.equal(out[3:], out2[3:])


def test_bad_inputs_fail_with_clear_errors():
    q = torch.randn(8, 1, 4, 16)
    with pytest.raises(ValueError, match="divides the number of query heads"):
        ring_attention(q, torch.randn(8, 1, 3, 16), torch.randn(8, 1, 3, 16))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ring_attention(q, q, q, attention_mask=torch.zeros(1, 1, 8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend 'fused' needs"):
        resolve_backend("fused", device=torch.device("cpu"), dtype=torch.float32, has_mask=True)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("flash", device=torch.device("cpu"), dtype=torch.float32, has_mask=False)
    assert resolve_backend("auto", device=torch.device("cpu"), dtype=torch.float32, has_mask=True) == "torch"


def _module(**config_overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from betterai_megatron.model.ring_attention import RingDotProductAttention

    settings = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0)
    config = TransformerConfig(**{**settings, **config_overrides})
    alone = ProcessGroupCollection(tp=None, cp=None)  # no process groups: tp = cp = 1
    return RingDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=alone)


def test_module_without_groups_is_plain_causal_attention_and_honours_the_mask():
    module = _module()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 2, 4, 8, generator=gen)
    k, v = (torch.randn(6, 2, 2, 8, generator=gen) for _ in range(2))
    out = module(q, k, v, None)
    assert out.shape == (6, 2, 32)
    ref = _naive(q.double(), k.double(), v.double(), causal=True, scale=8**-0.5)
    assert _rel(out, ref.reshape(6, 2, 32)) < 1e-5
    doc = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    doc[:, :, 2:, :2] = True
    out = module(q, k, v, doc)
    ref = _naive(q.double(), k.double(), v.double(), causal=True, scale=8**-0.5, mask=doc)
    assert _rel(out, ref.reshape(6, 2, 32)) < 1e-5


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(attention_dropout=0.1), "model.attention_dropout"),
        (dict(window_size=(4, 0)), "sliding-window"),
        (dict(softmax_type="off-by-one"), "softmax_type"),
    ],
)
def test_module_refuses_what_it_does_not_implement(overrides, message):
    with pytest.raises(ValueError, match=message):
        _module(**overrides)
