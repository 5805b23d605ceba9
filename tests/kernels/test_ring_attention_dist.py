"""Ring attention across real CP ranks (``torchrun``, gloo) against plain full attention on the whole sequence.

Every rank draws the *full* ``q, k, v, dout`` from one seed, computes the reference -- naive softmax attention in
fp64 with ``repeat_interleave`` GQA, written here -- on the whole sequence, and compares its own slice (taken with
an index list written out below, not the package's helper) of outputs and gradients with what the ring computes
from the local slices only. Also checks ``RingDotProductAttention`` against megatron-core's own
``DotProductAttention`` run on the full sequence, with masks sliced by megatron-core's ``get_batch_on_this_cp_rank``.

Run by pytest (which launches ``torchrun`` on this file) -- the worker half is under ``__main__``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

RTOL = 1e-5  # relative to the largest reference entry, fp32
# The megatron-core module checks run in the cp=2 launch only: importing megatron-core costs every process
# seconds of CPU, and the cp=4 launch exercises the same kernel the module calls.
MODULE_CP_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("cp_size", [2, 4])
def test_ring_attention_matches_full_attention_across_cp_ranks(cp_size):
    out = _torchrun(cp_size)
    # every case of the worker reports OK on every rank; a missing line means the worker skipped something
    cases = ["kernel causal gqa fused", "kernel causal gqa torch", "kernel noncausal fused",
             "kernel noncausal torch", "kernel causal docmask torch", "kernel mqa bf16"]  # fmt: skip
    if cp_size == MODULE_CP_SIZE:
        cases += ["module causal", "module ltor mask", "module docmask", "module cp1", "module cp1 docmask"]
    for case in cases:
        assert out.count(f"OK {case} rank=") == cp_size, out


# ------------------------------------------------------------------------------------------------ worker


def _positions(rank: int, cp: int, seq: int) -> list[int]:
    """Hand-written load-balanced order: chunks ``rank`` and ``2cp-1-rank`` of ``2cp`` equal chunks."""
    chunk = seq // (2 * cp)
    first = list(range(rank * chunk, (rank + 1) * chunk))
    second = list(range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))
    return first + second


def _reference(q, k, v, *, causal, scale, mask=None):
    """Naive attention, ``[s, b, h, d]`` layout, fp64; ``mask`` bool [b, 1, s, s], True = masked."""
    import torch

    seq, groups = q.shape[0], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)


def _document_mask(batch: int, seq: int, starts: list[list[int]]):
    """[b, 1, s, s] bool, True where query and key lie in different documents (causal part left out)."""
    import torch

    doc = torch.zeros(batch, seq, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        for start in row_starts:
            doc[row, start:] += 1
    return (doc.unsqueeze(2) != doc.unsqueeze(1)).unsqueeze(1)


def _rel(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _check(name, pairs, rtol):
    errors = {label: _rel(a, e) for label, a, e in pairs}
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"{name}: relative errors above {rtol}: {bad}"
    return errors


def _kernel_case(name, *, cp, rank, group, batch, seq, heads, groups, dim, causal, backend, dtype, rtol,
                 mask_starts=None):  # fmt: skip
    import torch

    from betterai_megatron.kernels.ring_attention import ring_attention

    gen = torch.Generator().manual_seed(1234)
    q, dout = (torch.randn(seq, batch, heads, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(seq, batch, groups, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    scale = 0.7 / dim**0.5
    mask = _document_mask(batch, seq, mask_starts) if mask_starts else None
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_leaves, causal=causal, scale=scale, mask=mask)
    ref.backward(dout)

    index = torch.tensor(_positions(rank, cp, seq))
    local = [t.index_select(0, index).to(dtype).requires_grad_() for t in (q, k, v)]
    local_mask = mask.index_select(2, index) if mask is not None else None
    out = ring_attention(*local, cp_group=group, causal=causal, softmax_scale=scale,
                         attention_mask=local_mask, backend=backend)  # fmt: skip
    out.backward(dout.index_select(0, index).to(dtype))
    pairs = [("out", out, ref.detach().index_select(0, index))]
    pairs += [(f"d{n}", t.grad, r.grad.index_select(0, index)) for n, t, r in zip("qkv", local, ref_leaves)]
    errors = _check(name, pairs, rtol)
    print(f"OK {name} rank={rank} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)


def _kernel_checks(cp, rank, group):
    import torch

    common = dict(cp=cp, rank=rank, group=group, batch=2, seq=8 * cp, dim=16)
    f32 = dict(dtype=torch.float32, rtol=RTOL)
    for backend in ("fused", "torch"):
        _kernel_case(f"kernel causal gqa {backend}", heads=4, groups=2, causal=True, backend=backend,
                     **common, **f32)  # fmt: skip
        _kernel_case(f"kernel noncausal {backend}", heads=3, groups=3, causal=False, backend=backend,
                     **common, **f32)  # fmt: skip
    # documents restart at different places in the two sequences; the mask forces the torch block kernel
    starts = [[3, 8 * cp - 5], [8 * cp // 2 + 1]]
    _kernel_case("kernel causal docmask torch", heads=4, groups=1, causal=True, backend="auto",
                 mask_starts=starts, **common, **f32)  # fmt: skip
    _kernel_case("kernel mqa bf16", heads=4, groups=1, causal=True, backend="auto", dtype=torch.bfloat16,
                 rtol=2e-2, **common)  # fmt: skip


def _module_case(name, *, cp, rank, mask_kind, pg_collection=None):
    import dataclasses

    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    from betterai_megatron.model.ring_attention import RingDotProductAttention
    from betterai_megatron.parallel.context_parallel import slice_for_cp_rank

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=cp)  # fmt: skip
    ring = RingDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg_collection)
    reference = DotProductAttention(
        dataclasses.replace(config, context_parallel_size=1), 1, AttnMaskType.causal, "self",
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"]),
    )  # fmt: skip
    seq, batch = 8 * cp, 2
    gen = torch.Generator().manual_seed(99)
    q, dout = (torch.randn(seq, batch, 4, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(seq, batch, 2, 16, generator=gen) for _ in range(2))
    causal_mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).expand(batch, 1, seq, seq)
    mask = {"none": None, "ltor": causal_mask,
            "doc": causal_mask | _document_mask(batch, seq, [[5], [2, 9]])}[mask_kind]  # fmt: skip
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference(*full, mask)
    expected.backward(dout.reshape(seq, batch, -1))

    local = [slice_for_cp_rank(t, seq_dim=0, cp_size=cp, cp_rank=rank).requires_grad_() for t in (q, k, v)]
    local_mask = None
    if mask is not None:  # sliced by megatron-core's own CP batch helper (rows only)
        cp_group = pg_collection.cp if pg_collection is not None else None
        local_mask = get_batch_on_this_cp_rank({"attention_mask": mask.clone()}, cp_group)["attention_mask"]
    out = ring(*local, local_mask)
    out.backward(slice_for_cp_rank(dout, seq_dim=0, cp_size=cp, cp_rank=rank).reshape(out.shape))
    index = torch.tensor(_positions(rank, cp, seq))
    pairs = [("out", out, expected.detach().index_select(0, index))]
    pairs += [(f"d{n}", t.grad, r.grad.index_select(0, index)) for n, t, r in zip("qkv", local, full)]
    errors = _check(name, pairs, RTOL)
    print(f"OK {name} rank={rank} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)


def _worker() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    _kernel_checks(cp, rank, dist.group.WORLD)
    if cp == MODULE_CP_SIZE:
        _module_checks(cp, rank)
    dist.destroy_process_group()


def _module_checks(cp: int, rank: int) -> None:
    import torch.distributed as dist

    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()  # before megatron-core builds anything
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(123)  # DotProductAttention forks the model-parallel RNG for dropout
    _module_case("module causal", cp=cp, rank=rank, mask_kind="none")
    _module_case("module ltor mask", cp=cp, rank=rank, mask_kind="ltor")
    _module_case("module docmask", cp=cp, rank=rank, mask_kind="doc")
    # cp=1 through a pg_collection whose cp group holds this rank alone: the plain DotProductAttention result
    from megatron.core.process_groups_config import ProcessGroupCollection

    singles = [dist.new_group([r]) for r in range(cp)]  # every rank must create every group
    alone = ProcessGroupCollection(tp=singles[rank], cp=singles[rank])
    _module_case("module cp1", cp=1, rank=0, mask_kind="none", pg_collection=alone)
    _module_case("module cp1 docmask", cp=1, rank=0, mask_kind="doc", pg_collection=alone)
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    _worker()
