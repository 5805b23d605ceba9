"""Context parallelism under real process groups: one ``torchrun --nproc-per-node 4`` (gloo) launch, shared by
the tests below through a module fixture. Megatron-core's groups are built with dp=2 x cp=2 (CP groups {0,1} and
{2,3}); the world group serves as a cp=4 group.

* ``slice_batch_for_cp_group`` gives exactly what megatron-core's ``get_batch_on_this_cp_rank`` gives, using the
  CP rank (not the global rank); ``gather_from_cp_ranks`` restores the original sequence.
* Linear attention (DeltaNet, GLA, Gated DeltaNet) at cp=2 and cp=4 equals -- outputs and gradients -- the
  single-rank kernel run on the whole sequence in fp64 (the computation one rank would do), 1e-5 relative.
* The short-convolution halo: per-chunk convolutions fed by ``cp_previous_tokens`` equal one convolution over
  the whole sequence.

The worker half of this file runs under ``__main__``.
"""

from __future__ import annotations

import pytest

RTOL = 1e-5
LINEAR_CASES = ("delta_rule", "gla", "gated_delta_rule", "gated_delta_rule_gva")


@pytest.fixture(scope="module")
def worker_output() -> str:
    # imported here, not at the top: this file is also torchrun's worker script, run outside the tests package
    from tests.conftest import run_torchrun_worker

    return run_torchrun_worker(__file__, nproc=4, timeout=240)


@pytest.mark.distributed
def test_cp_slicing_matches_megatron_core_and_gathers_back(worker_output):
    assert worker_output.count("OK cp slicing") == 4, worker_output


@pytest.mark.distributed
@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_attention_across_cp_ranks_equals_one_rank(worker_output, case, cp_size):
    assert worker_output.count(f"OK linear {case} cp={cp_size} ") == 4, worker_output


@pytest.mark.distributed
@pytest.mark.parametrize("cp_size", [2, 4])
def test_short_conv_halo_equals_full_sequence_convolution(worker_output, cp_size):
    assert worker_output.count(f"OK conv halo cp={cp_size} ") == 4, worker_output


# ------------------------------------------------------------------------------------------------ worker


def _positions(rank: int, cp: int, seq: int) -> list[int]:
    chunk = seq // (2 * cp)
    return list(range(rank * chunk, (rank + 1) * chunk)) + list(
        range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    )


def _rel(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _slicing_check(rank):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from betterai_megatron.parallel.context_parallel import (
        gather_from_cp_ranks,
        slice_batch_for_cp_group,
    )

    cp_group = parallel_state.get_context_parallel_group()
    seq, b = 16, 3
    gen = torch.Generator().manual_seed(rank // 2)  # the two CP ranks of one DP replica share a batch
    tokens = torch.randint(0, 1000, (b, seq), generator=gen)
    batch = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": torch.rand(b, seq, generator=gen),
        "position_ids": torch.arange(seq).repeat(b, 1),
        "attention_mask": torch.rand(b, 1, seq, seq, generator=gen) > 0.5,
    }
    ours = slice_batch_for_cp_group(batch, cp_group=cp_group)
    theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in batch.items()})
    for key in batch:
        assert torch.equal(ours[key], theirs[key]), f"rank {rank}: {key} differs from megatron-core"
    assert dist.get_rank(cp_group) == rank % 2  # megatron's order tp-cp-ep-dp-pp
    for key, seq_dim in (("tokens", 1), ("attention_mask", 2)):
        assert torch.equal(gather_from_cp_ranks(ours[key], seq_dim=seq_dim, cp_group=cp_group), batch[key])
    print(f"OK cp slicing rank={rank}", flush=True)


def _linear_inputs(case: str, seq: int, gen):
    import torch
    import torch.nn.functional as F

    b, h, dk, dv = 2, 2, 8, 6
    hv = 4 if case.endswith("gva") else h
    x = {
        "q": torch.randn(b, seq, h, dk, generator=gen, dtype=torch.float64),
        "k": torch.randn(b, seq, h, dk, generator=gen, dtype=torch.float64),
        "v": torch.randn(b, seq, hv, dv, generator=gen, dtype=torch.float64),
    }
    if case.startswith("gated"):
        x["g"] = -0.3 * F.softplus(torch.randn(b, seq, hv, generator=gen, dtype=torch.float64))
    if case == "gla":
        x["g"] = F.logsigmoid(torch.randn(b, seq, h, dk, generator=gen, dtype=torch.float64)) / 4
    if case != "gla":
        x["beta"] = torch.randn(b, seq, hv, generator=gen, dtype=torch.float64).sigmoid()
    return x


def _linear_check(case: str, *, group, cp: int, rank: int):
    import torch

    from betterai_megatron.kernels import (
        chunk_delta_rule,
        chunk_gated_delta_rule,
        chunk_gla,
    )
    from betterai_megatron.kernels import cp_linear_attention as cpl

    seq = 12 * cp  # local chunks of 6 tokens, kernel chunks of 4: padding inside chunks is exercised too
    common = dict(chunk_size=4)
    if case == "gla":
        single = lambda x: chunk_gla(x["q"], x["k"], x["v"], x["g"], **common)[0]
        split = lambda x: cpl.cp_chunk_gla(x["q"], x["k"], x["v"], x["g"], cp_group=group, **common)
    elif case == "delta_rule":
        common["use_qk_l2norm_in_kernel"] = True
        single = lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], **common)[0]
        split = lambda x: cpl.cp_chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], cp_group=group, **common)
    else:
        common["use_qk_l2norm_in_kernel"] = True
        single = lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **common)[0]
        split = lambda x: cpl.cp_chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], x["g"], x["beta"], cp_group=group, **common
        )
    gen = torch.Generator().manual_seed(7 + cp)
    full = {n: t.requires_grad_() for n, t in _linear_inputs(case, seq, gen).items()}
    expected = single(full)
    dout = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(dout)
    index = torch.tensor(_positions(rank, cp, seq))
    local = {n: t.detach().index_select(1, index).float().requires_grad_() for n, t in full.items()}
    out = split(local)
    out.backward(dout.index_select(1, index).float())
    errors = {"o": _rel(out, expected.detach().index_select(1, index))}
    errors.update({f"d{n}": _rel(local[n].grad, full[n].grad.index_select(1, index)) for n in full})
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad, f"linear {case} cp={cp} rank={rank}: relative errors above {RTOL}: {bad}"
    print(f"OK linear {case} cp={cp} rank={rank} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)


def _conv_check(*, group, cp: int, rank: int):
    import torch

    from betterai_megatron.kernels.cp_linear_attention import cp_previous_tokens
    from betterai_megatron.model.linear_attention.short_conv import causal_short_conv

    seq, width = 8 * cp, 4
    gen = torch.Generator().manual_seed(11)
    x_full = torch.randn(2, 5, seq, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, width, generator=gen, dtype=torch.float64)
    expected, _ = causal_short_conv(x_full, weight)
    dout = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(dout)
    index = torch.tensor(_positions(rank, cp, seq))
    x = x_full.detach().index_select(2, index).requires_grad_()
    halos = cp_previous_tokens(x, count=width - 1, cp_group=group)
    half = x.shape[-1] // 2
    out = torch.cat([causal_short_conv(x[..., :half], weight, halos[0])[0],
                     causal_short_conv(x[..., half:], weight, halos[1])[0]], dim=-1)  # fmt: skip
    out.backward(dout.index_select(2, index))
    assert _rel(out, expected.detach().index_select(2, index)) < 1e-12
    assert _rel(x.grad, x_full.grad.index_select(2, index)) < 1e-12
    print(f"OK conv halo cp={cp} rank={rank} ", flush=True)


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=2)  # 4 ranks: dp=2 x cp=2
    rank = dist.get_rank()
    _slicing_check(rank)
    cp2 = parallel_state.get_context_parallel_group()
    for group in (cp2, dist.group.WORLD):
        cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        for case in LINEAR_CASES:
            _linear_check(case, group=group, cp=cp, rank=cp_rank)
        _conv_check(group=group, cp=cp, rank=cp_rank)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
