"""Linear-attention benchmark: ``python -m benchmarks.linear_attention [--quick] [--threads N] [--seq-lengths ...]``.

Two tables, side by side in one run:

1. Kernels at T=2048: our chunked torch kernels (``chunk_*``) against the token-by-token recurrence
   (``fused_recurrent_*`` on the torch path, the "naive" form), forward and forward+backward. On CUDA with fla
   installed, fla's Triton kernels are timed as a third column.
2. Models: forward+backward time of a 4-layer hybrid ``GGGA`` stack (three Gated DeltaNet layers, one softmax
   layer) against an all-softmax ``AAAA`` stack of the same size (megatron-core ``TransformerLayer``s from the
   local spec, our mixer in the self-attention slot), for sequence lengths 1k..16k. The per-token cost column
   shows how each grows: flat for the linear layers, rising linearly in T for softmax attention. Softmax lengths
   whose score matrices would not fit the memory budget are reported as skipped.

Timing: median of a few runs after a warm-up, wall clock, fp32. ``--threads`` defaults to 1 because the CPU
boxes this runs on are shared: oversubscribed OpenMP threads spin and distort every number.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import socket
import statistics
import time

import torch
import torch.nn.functional as F

from betterai_megatron.kernels import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
)


def _median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _kernel_inputs(kind, *, batch, length, heads, dim, device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads, dim, generator=gen)
    k = torch.randn(batch, length, heads, dim, generator=gen)
    v = torch.randn(batch, length, heads, dim, generator=gen)
    extra = {}
    if kind == "gla":
        extra["g"] = F.logsigmoid(torch.randn(batch, length, heads, dim, generator=gen)) / 16
    else:
        k = F.normalize(k, dim=-1)
        extra["beta"] = torch.rand(batch, length, heads, generator=gen)
        if kind == "gated_delta_rule":
            extra["g"] = F.logsigmoid(torch.randn(batch, length, heads, generator=gen))
    tensors = dict(q=q, k=k, v=v, **extra)
    return {n: t.to(device).requires_grad_(True) for n, t in tensors.items()}


def _kernel_call(kind, form, x, backend, chunk_size):
    if kind == "delta_rule":
        if form == "chunk":
            return chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], chunk_size=chunk_size, backend=backend)[0]
        return fused_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], backend=backend)[0]
    if kind == "gated_delta_rule":
        if form == "chunk":
            return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=chunk_size,
                                          backend=backend)[0]
        return fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                                                backend=backend)[0]
    if form == "chunk":
        return chunk_gla(x["q"], x["k"], x["v"], x["g"], chunk_size=chunk_size, backend=backend)[0]
    return fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["g"], backend=backend)[0]


def kernel_table(*, length, batch, heads, dim, chunk_size, repeats):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from betterai_megatron.kernels._fla_compat import fla_ops

    with_fla = device == "cuda" and fla_ops() is not None
    print(f"\n## Kernels: B={batch} T={length} H={heads} K=V={dim} chunk={chunk_size} device={device} "
          f"threads={torch.get_num_threads()}")
    header = "| kernel | pass | recurrent (ms) | chunked (ms) | speed-up |" + (" fla (ms) |" if with_fla else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind in ("delta_rule", "gla", "gated_delta_rule"):
        x = _kernel_inputs(kind, batch=batch, length=length, heads=heads, dim=dim, device=device)
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            def run(form, backend="torch"):
                def call():
                    with torch.set_grad_enabled(backward):
                        o = _kernel_call(kind, form, x, backend, chunk_size)
                        if backward:
                            o.sum().backward()
                return call

            recurrent = _median_seconds(run("recurrent"), 1)
            chunked = _median_seconds(run("chunk"), repeats)
            row = f"| {kind} | {label} | {recurrent * 1e3:.0f} | {chunked * 1e3:.1f} | {recurrent / chunked:.1f}x |"
            if with_fla:
                for name in x:  # fla's delta rule refuses fp32
                    x[name] = x[name].detach().bfloat16().requires_grad_(True)
                row += f" {_median_seconds(run('chunk', 'fla'), repeats) * 1e3:.2f} |"
                x = _kernel_inputs(kind, batch=batch, length=length, heads=heads, dim=dim, device=device)
            print(row, flush=True)


def _init_megatron():
    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def build_stack(pattern: str, *, hidden: int, heads: int, ffn: int):
    """A megatron-core TransformerBlock whose layer i uses mixer pattern[i] (A: softmax attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from betterai_megatron.model.linear_attention import linear_attention_spec

    config = TransformerConfig(num_layers=len(pattern), hidden_size=hidden, num_attention_heads=heads,
                               ffn_hidden_size=ffn, normalization="RMSNorm", hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=torch.float32)
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    specs = []
    for letter in pattern:
        spec = copy.deepcopy(base)
        if letter != "A":
            spec.submodules = dataclasses.replace(spec.submodules, self_attention=linear_attention_spec(letter))
        specs.append(spec)
    block = TransformerBlock(config, TransformerBlockSubmodules(layer_specs=specs, layer_norm=WrappedTorchNorm))
    return block.to("cuda" if torch.cuda.is_available() else "cpu")


def model_table(*, seq_lengths, hidden, heads, ffn, repeats, memory_budget_gb):
    _init_megatron()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stacks = {p: build_stack(p, hidden=hidden, heads=heads, ffn=ffn) for p in ("GGGA", "AAAA")}
    print(f"\n## Models: 4 layers, hidden={hidden}, heads={heads}, ffn={ffn}, batch 1, fwd+bwd, device={device} "
          f"threads={torch.get_num_threads()}")
    print("| T | GGGA (s) | AAAA (s) | AAAA / GGGA | GGGA us/token | AAAA us/token |")
    print("|---|---|---|---|---|---|")
    for length in seq_lengths:
        x = torch.randn(length, 1, hidden, device=device, requires_grad=True)
        mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=device).triu(1)
        times = {}
        for pattern, stack in stacks.items():
            softmax_layers = pattern.count("A")
            # megatron's local attention keeps ~2 [heads, T, T] fp32 tensors per softmax layer for backward
            need_gb = 2 * softmax_layers * heads * length * length * 4 / 2**30
            if need_gb > memory_budget_gb:
                times[pattern] = None
                continue

            def step():
                out = stack(x, attention_mask=mask)
                out.square().mean().backward()

            times[pattern] = _median_seconds(step, repeats, warmup=length == seq_lengths[0])
        hybrid, softmax = times["GGGA"], times["AAAA"]
        fmt = lambda t: "skipped (memory)" if t is None else f"{t:.2f}"  # noqa: E731
        ratio = f"{softmax / hybrid:.2f}x" if hybrid and softmax else "-"
        per_token = lambda t: "-" if t is None else f"{t / length * 1e6:.0f}"  # noqa: E731
        print(f"| {length} | {fmt(hybrid)} | {fmt(softmax)} | {ratio} | {per_token(hybrid)} | {per_token(softmax)} |",
              flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see docstring)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--kernel-length", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--memory-budget-gb", type=float, default=10.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.kernel_length, args.seq_lengths = 256, [256, 512]
    if not args.skip_kernels:
        for dim in (64, 128):
            kernel_table(length=args.kernel_length, batch=1, heads=4, dim=dim, chunk_size=args.chunk_size,
                         repeats=3)
    if not args.skip_models:
        model_table(seq_lengths=args.seq_lengths, hidden=256, heads=4, ffn=1024, repeats=1 if not args.quick else 2,
                    memory_budget_gb=args.memory_budget_gb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
