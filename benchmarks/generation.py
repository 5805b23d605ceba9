"""Generation throughput on CPU: KV-cached decoding vs recomputing the whole prefix at every step.

Run: ``.venv/bin/python -m benchmarks.generation [--json out.json]`` (about two minutes on a 2-core box).

Measures, on tiny megatron-core GPTModels built from the local layer spec (weights random, seeded):

1. tokens/s of cached generation vs full recomputation, batch 8, 256 new tokens (greedy, no early stop, so
   both generate exactly the same 8 x 256 tokens -- checked), softmax-attention model;
2. time per decoding step as the sequence grows (mean over buckets of 32 positions), for the softmax model,
   a hybrid model (``GGGA``: three Gated DeltaNet layers -- constant-size recurrent state -- and one softmax
   attention layer, the 3:1 ratio of Qwen3-Next) and an all-Gated-DeltaNet one (``GGGG``);
3. what dropping finished rows saves: sampled generation where rows end at random steps (end-of-document),
   with and without dropping (same outputs, fewer rows computed).

Why cached softmax attention still grows per step: attention reads the whole cache (O(n) per step), and
megatron-core's static path without flash-decode stores keys *before* RoPE and re-rotates all cached keys at
every step (``attention.py``: ``apply_rotary_pos_emb(key, k_pos_emb[:sequence_end])``), which on CPU is the
largest O(n) term. The flash-decode path (GPU, flash-attn) rotates each key once before caching.

Not a test: the figures depend on the machine. Both wall time and this process's CPU time are reported; on a
box shared with other jobs the CPU time is the steadier figure (the per-step curves use it). Threads default to
1 because small matmuls gain nothing from more threads on a shared box and lose a lot to contention.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys


def _init_world() -> None:
    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a private rendezvous (not MASTER_PORT in os.environ, which child processes would inherit)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def _prompts(tokenizer, *, batch_size: int, prompt_tokens: int) -> list[list[int]]:
    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 8
    return [tokenizer.tokenize(text[i : i + prompt_tokens]) for i in range(batch_size)]


def _run(model, tokenizer, prompts, sampling, *, repeats: int = 1, **config):
    """Generate ``repeats`` times (after a warm-up); return (results, stats) of the run with the least CPU time."""
    from betterai_megatron.inference.config import GenerationConfig
    from betterai_megatron.inference.engine import GenerationEngine

    engine = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(max_batch_size=len(prompts), **config))
    engine.generate([p[:4] for p in prompts[:2]], sampling.replace(max_new_tokens=4))  # warm-up
    best = None
    for _ in range(repeats):
        results = engine.generate(prompts, sampling)
        if best is None or engine.last_stats.total_cpu_seconds < best[1].total_cpu_seconds:
            best = (results, engine.last_stats)
    return best


def _per_step_curve(stats, *, bucket: int) -> list[tuple[int, float]]:
    """(first position of bucket, mean CPU ms per decode step) over the decode steps (the prefill excluded)."""
    buckets: dict[int, list[float]] = {}
    for position, seconds in list(zip(stats.step_positions, stats.step_cpu_seconds))[1:]:
        buckets.setdefault(position // bucket * bucket, []).append(seconds * 1e3)
    return [(start, statistics.mean(values)) for start, values in sorted(buckets.items())]


def _print_curve(name: str, curve: list[tuple[int, float]]) -> None:
    print(f"  {name}: " + "  ".join(f"{pos}:{ms:.1f}" for pos, ms in curve))


def _throughput(stats) -> dict:
    return {"tokens_per_s_wall": stats.generated_tokens / stats.total_seconds,
            "tokens_per_s_cpu": stats.generated_tokens / stats.total_cpu_seconds,
            "wall_s": stats.total_seconds, "cpu_s": stats.total_cpu_seconds}


def _cached_vs_recompute(model, tokenizer, prompts, sampling, *, repeats: int) -> dict:
    cached, cached_stats = _run(model, tokenizer, prompts, sampling, repeats=repeats)
    uncached, uncached_stats = _run(model, tokenizer, prompts, sampling, use_kv_cache=False)
    figures = {"cached": _throughput(cached_stats), "recompute": _throughput(uncached_stats),
               "identical_tokens": [r.tokens for r in cached] == [r.tokens for r in uncached],
               "ms_per_step_cached": _per_step_curve(cached_stats, bucket=32),
               "ms_per_step_recompute": _per_step_curve(uncached_stats, bucket=32)}
    figures["speedup_wall"] = uncached_stats.total_seconds / cached_stats.total_seconds
    figures["speedup_cpu"] = uncached_stats.total_cpu_seconds / cached_stats.total_cpu_seconds
    for mode in ("cached", "recompute"):
        f = figures[mode]
        print(f"  {mode:9s}: {f['tokens_per_s_wall']:7.1f} tok/s wall ({f['wall_s']:.1f} s), "
              f"{f['tokens_per_s_cpu']:7.1f} tok/s of CPU time ({f['cpu_s']:.1f} s)")
    print(f"  speedup of the KV cache: {figures['speedup_wall']:.1f}x wall, {figures['speedup_cpu']:.1f}x CPU time; "
          f"identical tokens: {figures['identical_tokens']}")
    return figures


def _dropping_finished_rows(model, tokenizer, prompts, *, new_tokens: int, repeats: int) -> dict:
    from betterai_megatron.inference.config import SamplingParams

    # Temperature 1 on a random model: the end-of-document token ends rows at scattered steps.
    sampled = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=7)
    runs = {drop: _run(model, tokenizer, prompts, sampled, repeats=repeats, drop_finished_rows=drop) for drop in (True, False)}
    figures = {"row_lengths": sorted(len(r.tokens) for r in runs[True][0]),
               "rows_computed": [runs[True][1].computed_rows, runs[False][1].computed_rows],
               "cpu_s": [runs[True][1].total_cpu_seconds, runs[False][1].total_cpu_seconds],
               "wall_s": [runs[True][1].total_seconds, runs[False][1].total_seconds],
               "identical_tokens": [r.tokens for r in runs[True][0]] == [r.tokens for r in runs[False][0]]}
    print(f"dropping finished rows (row lengths {figures['row_lengths']}): rows computed "
          f"{figures['rows_computed'][0]} vs {figures['rows_computed'][1]} without dropping; CPU time "
          f"{figures['cpu_s'][0]:.2f} s vs {figures['cpu_s'][1]:.2f} s (wall {figures['wall_s'][0]:.2f} s vs "
          f"{figures['wall_s'][1]:.2f} s); same tokens: {figures['identical_tokens']}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="cached runs per figure; the one with least CPU time counts")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when the output goes to a file

    import torch

    torch.set_num_threads(args.threads)
    _init_world()
    from betterai_megatron.inference.config import SamplingParams
    from betterai_megatron.inference.testing import CharTokenizer, tiny_gpt_model

    tokenizer = CharTokenizer()
    prompts = _prompts(tokenizer, batch_size=args.batch_size, prompt_tokens=args.prompt_tokens)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_at_eod=False)
    size = {"hidden_size": args.hidden_size, "num_attention_heads": args.num_heads,
            "max_sequence_length": args.prompt_tokens + args.new_tokens}
    print(f"batch {args.batch_size}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, hidden "
          f"{args.hidden_size}, 4 layers, {args.threads} thread(s), best of {args.repeats} cached runs")
    figures: dict = {"config": vars(args)}
    softmax = tiny_gpt_model(layer_pattern="AAAA", **size)
    print("[AAAA: 4 softmax-attention layers]")
    figures["AAAA"] = _cached_vs_recompute(softmax, tokenizer, prompts, greedy, repeats=args.repeats)
    for pattern in ("GGGA", "GGGG"):
        hybrid = tiny_gpt_model(layer_pattern=pattern, **size)
        stats = _run(hybrid, tokenizer, prompts, greedy, repeats=args.repeats)[1]
        figures[pattern] = {"cached": _throughput(stats), "ms_per_step_cached": _per_step_curve(stats, bucket=32)}
        print(f"[{pattern}] cached: {stats.generated_tokens / stats.total_cpu_seconds:.1f} tok/s of CPU time")
    print("CPU ms per decode step by position (bucket start:mean ms); G = Gated DeltaNet, A = softmax attention")
    _print_curve("AAAA cached   ", figures["AAAA"]["ms_per_step_cached"])
    _print_curve("AAAA recompute", figures["AAAA"]["ms_per_step_recompute"])
    _print_curve("GGGA cached   ", figures["GGGA"]["ms_per_step_cached"])
    _print_curve("GGGG cached   ", figures["GGGG"]["ms_per_step_cached"])
    figures["drop_finished_rows"] = _dropping_finished_rows(softmax, tokenizer, prompts, new_tokens=args.new_tokens,
                                                            repeats=args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
