"""What the trainer adds on top of megatron-core: step time of ``betterai pretrain`` over a bare megatron-core loop.

    .venv/bin/python -m benchmarks.trainer_overhead [--steps 50] [--warmup 5] [--rounds 3] [override ...]

Both run in this one process, alternating ``--rounds`` times (bare, betterai, bare, betterai, ...), on the same
config (``examples/configs/tiny_cpu.yaml`` plus overrides), model, data and optimiser:

* **bare**: megatron-core only, the loop written here — zero the DDP grad buffer, ``forward_backward_func`` over
  the micro-batches, ``optimizer.step()``; nothing else (no scheduler, no loss reduction, no checks, no logging).
* **betterai**: ``betterai pretrain`` itself (``betterai_megatron.cli.main``), checkpointing off, TensorBoard
  off, a metrics record and console line every step (``log.interval=1``: the most logging it ever does).

A step's time is the wall time between the same point of consecutive iterations (for betterai, the ``wall_time``
of consecutive ``metrics.jsonl`` records), so it includes everything the loop does per step. The first
``--warmup`` steps of every run are dropped; the table gives medians over the rest and their ratio (goal: at
most 1.05); the p10 column is the less noise-prone figure on a shared machine. The tiny model makes the per-step overhead as visible as it can be: on a real model the fixed
per-step cost of the trainer (one small all-reduce, a pass over the gradients for NaN/Inf, a log line) is a
smaller fraction still.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def run_betterai(steps: int, overrides: list[str], run_dir: Path) -> tuple[list[float], list[float]]:
    """Per-step wall times of ``betterai pretrain`` (from consecutive metrics records), and the times its
    ``train_step`` alone took (``step_time_s``: schedule, reductions, checks, optimizer; no logging)."""
    from betterai_megatron.cli import main

    code = main(["pretrain", "--config", str(CONFIG), f"train.steps={steps}", f"run.dir={run_dir}",
                 "checkpoint.save_on_exit=false", "log.tensorboard=false", "log.interval=1", "log.level=WARNING",
                 *overrides])
    if code != 0:
        raise SystemExit(f"betterai pretrain failed with {code}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["wall_time"] for r in records if "loss" in r]
    return [b - a for a, b in pairwise(stamps)], [r["step_time_s"] for r in records if "loss" in r][1:]


def _bare_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].reshape(-1)

    def loss_func(output_tensor):
        loss = torch.sum(output_tensor.float().reshape(-1) * mask)
        tokens = mask.sum().to(torch.int)
        return loss, tokens, {"lm loss": torch.stack([loss.detach().double(), tokens.double()])}

    return output, loss_func


def _bare_batches(dataset, *, start: int, count: int, micro_batch_size: int):
    for m in range(count):
        samples = [dataset[start + m * micro_batch_size + i] for i in range(micro_batch_size)]
        yield {key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])).to(
            torch.float32 if key == "loss_mask" else torch.int64)
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def run_bare(steps: int, overrides: list[str]) -> list[float]:
    """Per-step wall times of a bare megatron-core loop on the same model, data and optimiser (1 process)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from betterai_megatron.config import load_config
    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
    from betterai_megatron.platform.distributed import init_distributed
    from betterai_megatron.training.data import build_datasets

    config = load_config(CONFIG, [f"train.steps={steps}", *overrides])
    t = config.train
    init_distributed(backend="gloo")
    initialize_parallel(config.parallel, seed=t.seed)
    chunks, transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                    seq_length=t.seq_length, seed=t.seed)
    model = DistributedDataParallel(config=transformer_config, module=chunks[0],
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps, clip_grad=t.clip_grad), [model])
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.grad_scale_func = optimizer.scale_loss
    transformer_config.no_sync_func = model.no_sync
    train_dataset, _ = build_datasets(config, train_samples=steps * t.global_batch_size, valid_samples=0)
    num_micro_batches = t.global_batch_size // t.micro_batch_size
    forward_backward = get_forward_backward_func()
    stamps = []
    for step in range(steps):
        stamps.append(time.perf_counter())
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=_bare_forward_step,
                         data_iterator=_bare_batches(train_dataset, start=step * t.global_batch_size,
                                                     count=num_micro_batches, micro_batch_size=t.micro_batch_size),
                         model=model, num_microbatches=num_micro_batches, seq_length=t.seq_length,
                         micro_batch_size=t.micro_batch_size, forward_only=False)
        optimizer.step()
    stamps.append(time.perf_counter())
    destroy_parallel()
    return [b - a for a, b in pairwise(stamps[1:])]  # same convention: from the 2nd iteration on


def _summary(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    return (statistics.median(ordered), ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/betterai runs of each")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both (1: least sensitive to other load on the machine)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both, e.g. train.global_batch_size=16")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 3")
    torch.set_num_threads(args.threads)
    bare, betterai, train_step_only = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            bare += run_bare(args.steps, args.overrides)[args.warmup:]
            loop, inner = run_betterai(args.steps, args.overrides, Path(tmp) / f"run{round_index}")
            betterai += loop[args.warmup:]
            train_step_only += inner[args.warmup:]
    rows = [("bare megatron-core loop", _summary(bare), len(bare)),
            ("betterai pretrain", _summary(betterai), len(betterai)),
            ("  of which train_step", _summary(train_step_only), len(train_step_only))]
    print(f"\ntiny config {CONFIG.name} {' '.join(args.overrides)}: {args.steps} steps x {args.rounds} rounds, "
          f"first {args.warmup} of each run dropped; torch threads {torch.get_num_threads()}")
    print(f"{'':26s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s} {'steps':>6s}")
    for name, (median, p10, p90), count in rows:
        print(f"{name:26s} {median * 1e3:10.2f} {p10 * 1e3:8.2f} {p90 * 1e3:8.2f} {count:6d}")
    median_ratio = rows[1][1][0] / rows[0][1][0]
    p10_ratio = rows[1][1][1] / rows[0][1][1]
    print(f"{'step-time ratio':26s} {median_ratio:10.3f} {p10_ratio:8.3f}   (betterai / bare; goal <= 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
