"""Benchmark of context parallelism: memory and time per CP rank at long sequence lengths, softmax and hybrid.

    .venv/bin/python -m benchmarks.context_parallel                       # 8k, 16k, 32k tokens; cp = 1, 2, 4
    .venv/bin/python -m benchmarks.context_parallel --seq-lengths 2048,4096 --cp 1,2 --json out.json

For each ``cp`` it launches ``torchrun --nproc-per-node cp`` (gloo, CPU) and runs forward + backward of three
workloads (``--workloads``) on each rank's ``seq / cp`` tokens (megatron's load-balanced chunks):

* ``attention`` -- one causal GQA ring-attention layer (:func:`betterai_megatron.kernels.ring_attention.
  ring_attention`; at cp=1 the same kernel is plain fused attention);
* ``gdn`` -- one Gated DeltaNet recurrence with its short convolution: :func:`~betterai_megatron.model.
  linear_attention.short_conv.cp_causal_short_conv` (halo from the preceding chunk) and :func:`~betterai_megatron.
  kernels.cp_linear_attention.cp_chunk_gated_delta_rule` (state passed across ranks); at cp=1 the plain kernels;
* ``hybrid`` -- the whole ``tiny`` preset with ``model.layer_pattern=GGGA`` (3 Gated DeltaNet : 1 softmax, as
  Qwen3-Next) built by the package's model builder, loss and backward. At cp=1 its softmax layer's core attention is
  swapped for the ring module too (a one-rank ring is fused attention): megatron's local attention would keep the
  ``s x s`` scores (16 GiB at 32k) and the comparison would no longer be about CP.

Reported per rank (the worst rank):

* ``saved MiB`` -- bytes autograd keeps between forward and backward (``saved_tensors_hooks``): the attention
  activation memory proper; should fall as ``1 / cp``.
* ``peak MiB`` -- peak resident memory of the step above the inputs (``VmHWM`` after ``clear_refs``; glibc is
  told to ``mmap`` every large block so freed memory really leaves): activations plus transient ring buffers,
  fp32 accumulators and gradients.
* ``step s`` -- forward + backward wall time (median of ``--repeats``); ``fwd s`` alone.
* communication (mean over ranks): ``comm MiB`` sent per rank per step; ``comm-only s``, the same exchanges
  with no compute in between; ``blocked s``, time spent waiting on exchanges during the step, split by
  timestamps (``RingCommStats``; one host, one monotonic clock) into ``late nbr s`` -- waiting before both ring
  neighbours had even posted that exchange, i.e. a neighbour still computing (imbalance, and on an
  oversubscribed CPU mostly scheduling noise) -- and ``exposed s``, communication not hidden behind compute;
  ``hidden`` = ``1 - exposed / comm-only``. Ring columns exist for ``attention`` and ``hybrid`` (its A layer);
  ``gdn`` exchanges only the per-chunk state summaries (one all-gather, size independent of ``seq``).

CPU caveat: each rank gets ``cpu_count // cp`` threads (at least 1; ``--threads-per-rank`` overrides), so on a
2-core box ``cp=4`` runs 4 ranks on 2 cores and step times are not what 4 devices would give; the memory columns
are exact either way. ``saved MiB`` of ``hybrid`` includes the weights its matmuls save (constant, ~0.5 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def _ints(text: str) -> list[int]:
    return [int(x.replace("k", "")) * (1024 if x.endswith("k") else 1) for x in text.split(",") if x]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=_ints, default=[8192, 16384, 32768], help="comma list; 8k allowed")
    parser.add_argument("--cp", type=_ints, default=[1, 2, 4], help="comma list of context-parallel sizes")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-attention-heads", type=int, default=2)
    parser.add_argument("--num-query-groups", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per point (after one warm-up)")
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "torch"])
    parser.add_argument("--workloads", type=lambda t: [w for w in t.split(",") if w],
                        default=list(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="torch threads per rank (default cpu_count // cp; 1 = one core per rank, a device each)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ worker


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _comm_only_seconds(ring, kv, steps: int) -> float:
    """The exchanges of one forward + backward (``cp-1`` K/V hops each way, ``cp`` fp32 dK/dV hops), no compute."""
    import torch

    dkv = torch.zeros(kv.shape, dtype=torch.float32)
    torch.distributed.barrier()
    start = time.perf_counter()
    for tensor, hops in ((kv, steps - 1), (kv, steps - 1), (dkv, steps)):
        for _ in range(hops):
            ring.wait(ring.exchange(tensor, torch.empty_like(tensor), 7000))
    return time.perf_counter() - start


def _attention_workload(args, seq: int, group):
    """Ring attention on random ``q, k, v [s / cp, b, heads, d]``."""
    import torch

    from betterai_megatron.kernels import ring_attention as ra

    local = seq // group.size()
    shape_q = (local, args.micro_batch_size, args.num_attention_heads, args.head_dim)
    shape_kv = (local, args.micro_batch_size, args.num_query_groups, args.head_dim)
    q, k, v = (torch.randn(s, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q)

    def forward(stats):
        for t in (q, k, v):
            t.grad = None
        out = ra.ring_attention(q, k, v, cp_group=group, causal=True, backend=args.backend, stats=stats)
        return lambda: out.backward(dout)

    return forward, torch.stack((k.detach(), v.detach()))


def _gdn_workload(args, seq: int, group):
    """Short convolution + gated delta rule on random inputs, ``heads x head_dim`` keys and values."""
    import torch
    import torch.nn.functional as F

    from betterai_megatron.kernels import chunk_gated_delta_rule
    from betterai_megatron.kernels.cp_linear_attention import cp_chunk_gated_delta_rule
    from betterai_megatron.model.linear_attention.short_conv import causal_short_conv, cp_causal_short_conv

    cp, local = group.size(), seq // group.size()
    b, h, d = args.micro_batch_size, args.num_attention_heads, args.head_dim
    x = torch.randn(b, 3 * h * d, local, requires_grad=True)  # q | k | v channels before the convolution
    weight = (0.5 * torch.randn(3 * h * d, 4)).requires_grad_()
    g = (-0.1 * F.softplus(torch.randn(b, local, h))).requires_grad_()
    beta = torch.rand(b, local, h).requires_grad_()
    dout = torch.randn(b, local, h, d)

    def forward(stats):
        for t in (x, weight, g, beta):
            t.grad = None
        mixed = causal_short_conv(x, weight)[0] if cp == 1 else cp_causal_short_conv(x, weight, cp_group=group)
        q, k, v = mixed.transpose(1, 2).reshape(b, local, 3, h, d).unbind(2)
        if cp == 1:
            out = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]
        else:
            out = cp_chunk_gated_delta_rule(q, k, v, g, beta, cp_group=group, use_qk_l2norm_in_kernel=True)
        return lambda: out.backward(dout)

    return forward, None


_HYBRID: dict = {}  # the model, built once per worker (at the longest sequence)


def _hybrid_model(args, cp: int):
    if not _HYBRID:
        from betterai_megatron.config import load_config
        from betterai_megatron.model.builder import build_model_chunks
        from betterai_megatron.model.ring_attention import RingDotProductAttention
        from betterai_megatron.parallel.layout import initialize_parallel

        seq = max(args.seq_lengths)
        config = load_config(None, ["model.preset=tiny", "model.num_layers=4", "model.layer_pattern=GGGA",
                                    f"parallel.cp={cp}", f"train.seq_length={seq}",
                                    f"train.micro_batch_size={args.micro_batch_size}"])
        initialize_parallel(config.parallel, seed=config.train.seed)
        (model,), transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                          seq_length=seq, seed=config.train.seed)
        rings = []
        for layer in model.decoder.layers:
            attention = layer.self_attention
            if hasattr(attention, "core_attention"):
                if not isinstance(attention.core_attention, RingDotProductAttention):  # cp=1 (module docstring)
                    attention.core_attention = RingDotProductAttention(
                        config=transformer_config, layer_number=attention.layer_number,
                        attn_mask_type=attention.attn_mask_type, attention_type="self",
                        pg_collection=attention.pg_collection,
                    )
                rings.append(attention.core_attention)
        _HYBRID.update(model=model, rings=rings, config=transformer_config, vocab=config.model.vocab_size)
    return _HYBRID


def _hybrid_workload(args, seq: int, group):
    """The GGGA tiny model: this rank's tokens, summed token losses, backward."""
    import torch

    from betterai_megatron.parallel.context_parallel import local_token_positions

    hybrid = _hybrid_model(args, group.size())
    model, config = hybrid["model"], hybrid["config"]
    gen = torch.Generator().manual_seed(0)  # every rank draws the same whole sequence, then keeps its chunks
    tokens = torch.randint(0, hybrid["vocab"], (args.micro_batch_size, seq + 1), generator=gen)
    index = local_token_positions(seq_length=seq, cp_size=group.size(), cp_rank=torch.distributed.get_rank(group))
    inputs, labels = tokens[:, :-1][:, index], tokens[:, 1:][:, index]
    positions = index.unsqueeze(0).expand(args.micro_batch_size, -1)

    def forward(stats):
        model.zero_grad(set_to_none=True)
        for ring in hybrid["rings"]:
            ring.comm_stats = stats
        loss = model(inputs, positions, None, labels=labels).sum() / seq
        return loss.backward

    kv_shape = (seq // group.size(), args.micro_batch_size, config.num_query_groups, config.kv_channels)
    return forward, torch.zeros(2, *kv_shape)


WORKLOADS = {"attention": _attention_workload, "gdn": _gdn_workload, "hybrid": _hybrid_workload}


def _measure(args, seq: int, group, workload: str) -> dict:
    import torch
    import torch.distributed as dist

    from betterai_megatron.kernels import ring_attention as ra

    cp = dist.get_world_size(group)
    forward, kv = WORKLOADS[workload](args, seq, group)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    steps, forwards, peaks, stats = [], [], [], []
    for _ in range(args.repeats):
        saved.clear()
        stat = ra.RingCommStats()
        dist.barrier()
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backward = forward(stat)
        forward_s = time.perf_counter() - start
        backward()
        steps.append(time.perf_counter() - start)
        forwards.append(forward_s)
        peaks.append(_rss_bytes("VmHWM") - base)
        stats.append(stat)
        del backward
    ring = ra._Ring(group, None)
    comm_only = _comm_only_seconds(ring, kv, cp) if cp > 1 and kv is not None else 0.0
    return {
        "workload": workload, "seq_length": seq, "cp": cp, "step_s": statistics.median(steps),
        "forward_s": statistics.median(forwards), "saved_bytes": sum(saved.values()), "peak_bytes": max(peaks),
        "blocked_s": stats[-1].blocked_s, "comm_only_s": comm_only,
        "compute_s": statistics.median(s.compute_s for s in stats), "bytes_sent": stats[-1].bytes_sent,
        "post_times": stats[-1].post_times, "wait_spans": stats[-1].wait_spans, "ring": kv is not None,
    }  # fmt: skip


def _split_waits(every: list[dict]) -> list[tuple[float, float]]:
    """Per rank ``(late_neighbour_s, exposed_comm_s)``: of each wait, the part before both ring neighbours had
    posted the matching exchange is a neighbour running late; only the rest is communication left exposed."""
    cp = len(every)
    out = []
    for rank, mine in enumerate(every):
        late = exposed = 0.0
        for index, start, end in mine["wait_spans"]:
            ready = max(every[(rank - 1) % cp]["post_times"][index], every[(rank + 1) % cp]["post_times"][index])
            late += max(0.0, min(end, ready) - start)
            exposed += max(0.0, end - max(start, ready))
        out.append((late, exposed))
    return out


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()  # before megatron-core builds anything (the hybrid workload)
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    torch.set_num_threads(args.threads_per_rank or max(1, (os.cpu_count() or 1) // cp))
    torch.manual_seed(dist.get_rank())
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    rows = []
    for workload, seq in ((w, n) for w in args.workloads for n in args.seq_lengths):
        if seq == args.seq_lengths[0]:  # warm-up: kernels, gloo pairs
            _measure(warm, min(seq, 1024 * cp), dist.group.WORLD, workload)
        mine = _measure(args, seq, dist.group.WORLD, workload)
        every = [None] * cp
        dist.all_gather_object(every, mine)
        # memory and time: the worst rank; communication: the mean over ranks
        row = {key: max(r[key] for r in every) for key in mine if key not in ("post_times", "wait_spans", "workload")}
        row["workload"] = workload
        split = _split_waits(every)
        row["late_neighbour_s"] = statistics.mean(late for late, _ in split)
        row["exposed_comm_s"] = statistics.mean(exposed for _, exposed in split)
        for key in ("comm_only_s", "blocked_s"):
            row[key] = statistics.mean(r[key] for r in every)
        rows.append(row)
    if dist.get_rank() == 0:
        with open(args.result_file, "w") as out:
            json.dump(rows, out)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args, cp: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        forwarded = [
            "--seq-lengths", ",".join(map(str, args.seq_lengths)), "--micro-batch-size", str(args.micro_batch_size),
            "--num-attention-heads", str(args.num_attention_heads), "--num-query-groups",
            str(args.num_query_groups), "--head-dim", str(args.head_dim), "--repeats", str(args.repeats),
            "--threads-per-rank", str(args.threads_per_rank or 0), "--backend", args.backend,
            "--workloads", ",".join(args.workloads), "--worker", "--result-file", result,
        ]  # fmt: skip
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", "benchmarks.context_parallel", *forwarded,
        ]  # fmt: skip
        # every large block through mmap, so that freed memory leaves the process and VmHWM measures the peak
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
        subprocess.run(cmd, check=True, env=env)
        with open(result) as rows:
            return json.load(rows)


def _table(rows: list[dict]) -> str:
    head = f"{'workload':>9} {'seq':>6} {'cp':>3} {'tokens/rank':>11} {'saved MiB':>10} {'x cp=1':>7} {'peak MiB':>9} "
    head += f"{'fwd s':>7} {'step s':>7} {'comm MiB':>9} {'comm-only s':>11} {'blocked s':>9} {'late nbr s':>10} "
    head += f"{'exposed s':>9} {'hidden':>7}"
    lines = [head, "-" * len(head)]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    single = {(r["workload"], r["seq_length"]): r["saved_bytes"] for r in rows if r["cp"] == 1}
    for r in sorted(rows, key=lambda r: (order[r["workload"]], r["seq_length"], r["cp"])):
        base = single.get((r["workload"], r["seq_length"]))
        ratio = f"{r['saved_bytes'] / base:.3f}" if base else "-"
        ring = r["cp"] > 1 and r["ring"]
        hidden = f"{max(0.0, 1 - r['exposed_comm_s'] / r['comm_only_s']):.0%}" if ring else "-"
        comm = (f"{r['bytes_sent'] / MIB:>9.1f} {r['comm_only_s']:>11.3f} {r['blocked_s']:>9.3f} "
                f"{r['late_neighbour_s']:>10.3f} {r['exposed_comm_s']:>9.3f}") if ring else (
                f"{'-':>9} {'-':>11} {'-':>9} {'-':>10} {'-':>9}")  # fmt: skip
        lines.append(
            f"{r['workload']:>9} {r['seq_length']:>6} {r['cp']:>3} {r['seq_length'] // r['cp']:>11} "
            f"{r['saved_bytes'] / MIB:>10.1f} {ratio:>7} {r['peak_bytes'] / MIB:>9.1f} {r['forward_s']:>7.2f} "
            f"{r['step_s']:>7.2f} {comm} {hidden:>7}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return 0
    for cp in args.cp:
        for seq in args.seq_lengths:
            if seq % (2 * cp):
                raise SystemExit(f"--seq-lengths: {seq} is not divisible by 2 * cp = {2 * cp}")
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: {unknown} not in {sorted(WORKLOADS)}")
    rows = []
    for cp in args.cp:
        print(f"[context_parallel] cp={cp}: torchrun --nproc-per-node {cp} ...", file=sys.stderr, flush=True)
        rows += _launch(args, cp)

    print(
        f"fp32, forward+backward, b={args.micro_batch_size}, {os.cpu_count()} CPU cores; attention: causal GQA heads "
        f"{args.num_attention_heads}/{args.num_query_groups} x {args.head_dim}; "
        f"gdn: {args.num_attention_heads} heads x {args.head_dim}; "
        "hybrid: tiny preset, 4 layers GGGA (hidden 64, heads 4/2 x 16)"
    )
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
