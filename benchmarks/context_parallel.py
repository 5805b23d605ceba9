"""Benchmark of context parallelism for softmax attention: memory and time per CP rank at long sequence lengths.

    .venv/bin/python -m benchmarks.context_parallel                       # 8k, 16k, 32k tokens; cp = 1, 2, 4
    .venv/bin/python -m benchmarks.context_parallel --seq-lengths 2048,4096 --cp 1,2 --json out.json

For each ``cp`` it launches ``torchrun --nproc-per-node cp`` (gloo, CPU) running one causal GQA ring-attention
layer (:func:`betterai_megatron.kernels.ring_attention.ring_attention`) forward + backward on each rank's
``seq / cp`` tokens, and reports per rank (the worst rank):

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
  ``hidden`` = ``1 - exposed / comm-only``.

CPU caveat: each rank gets ``cpu_count // cp`` threads (at least 1), so on a 2-core box ``cp=4`` runs 4 ranks on
2 cores and step times are not what 4 devices would give; the memory columns are exact either way.
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


def _measure(args, seq: int, group) -> dict:
    import torch
    import torch.distributed as dist

    from betterai_megatron.kernels import ring_attention as ra

    cp = dist.get_world_size(group)
    local = seq // cp
    shape_q = (local, args.micro_batch_size, args.num_attention_heads, args.head_dim)
    shape_kv = (local, args.micro_batch_size, args.num_query_groups, args.head_dim)
    q, k, v = (torch.randn(s, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    steps, forwards, peaks, stats = [], [], [], []
    for _ in range(args.repeats):
        for t in (q, k, v):
            t.grad = None
        saved.clear()
        stat = ra.RingCommStats()
        dist.barrier()
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ra.ring_attention(q, k, v, cp_group=group, causal=True, backend=args.backend, stats=stat)
        forward_s = time.perf_counter() - start
        out.backward(dout)
        steps.append(time.perf_counter() - start)
        forwards.append(forward_s)
        peaks.append(_rss_bytes("VmHWM") - base)
        stats.append(stat)
        del out
    ring = ra._Ring(group, None)
    comm_only = _comm_only_seconds(ring, torch.stack((k.detach(), v.detach())), cp) if cp > 1 else 0.0
    return {
        "seq_length": seq, "cp": cp, "step_s": statistics.median(steps), "forward_s": statistics.median(forwards),
        "saved_bytes": sum(saved.values()), "peak_bytes": max(peaks), "blocked_s": stats[-1].blocked_s,
        "comm_only_s": comm_only, "compute_s": statistics.median(s.compute_s for s in stats),
        "bytes_sent": stats[-1].bytes_sent, "post_times": stats[-1].post_times, "wait_spans": stats[-1].wait_spans,
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

    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    torch.manual_seed(dist.get_rank())
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    _measure(warm, min(args.seq_lengths[0], 1024 * cp), dist.group.WORLD)  # warm-up: kernels, gloo pairs
    rows = []
    for seq in args.seq_lengths:
        mine = _measure(args, seq, dist.group.WORLD)
        every = [None] * cp
        dist.all_gather_object(every, mine)
        # memory and time: the worst rank; communication: the mean over ranks
        row = {key: max(r[key] for r in every) for key in mine if key not in ("post_times", "wait_spans")}
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
            "--backend", args.backend, "--worker", "--result-file", result,
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
    head = f"{'seq':>6} {'cp':>3} {'tokens/rank':>11} {'saved MiB':>10} {'peak MiB':>9} {'fwd s':>7} {'step s':>7} "
    head += f"{'comm MiB':>9} {'comm-only s':>11} {'blocked s':>9} {'late nbr s':>10} {'exposed s':>9} {'hidden':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["seq_length"], r["cp"])):
        hidden = "-" if r["cp"] == 1 else f"{max(0.0, 1 - r['exposed_comm_s'] / r['comm_only_s']):.0%}"
        lines.append(
            f"{r['seq_length']:>6} {r['cp']:>3} {r['seq_length'] // r['cp']:>11} {r['saved_bytes'] / MIB:>10.1f} "
            f"{r['peak_bytes'] / MIB:>9.1f} {r['forward_s']:>7.2f} {r['step_s']:>7.2f} "
            f"{r['bytes_sent'] / MIB:>9.1f} {r['comm_only_s']:>11.3f} {r['blocked_s']:>9.3f} "
            f"{r['late_neighbour_s']:>10.3f} {r['exposed_comm_s']:>9.3f} {hidden:>7}"
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
    rows = []
    for cp in args.cp:
        print(f"[context_parallel] cp={cp}: torchrun --nproc-per-node {cp} ...", file=sys.stderr, flush=True)
        rows += _launch(args, cp)
    print(
        f"causal GQA ring attention, b={args.micro_batch_size}, heads {args.num_attention_heads}/"
        f"{args.num_query_groups} x {args.head_dim}, fp32, forward+backward, {os.cpu_count()} CPU cores"
    )
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
