"""The pipeline's summary: per stage status and timings, and the numbers that say whether the run learned.

Read from what the stages write (nothing is recomputed):

* ``pretrain/metrics.jsonl``, ``sft/metrics.jsonl`` (trainer): records with ``loss`` (one per logged step) and
  ``val_loss`` (one per validation pass) -> first and last train loss, first and last validation loss;
* ``grpo/metrics.jsonl`` (GRPO stage): ``reward_mean``, ``pass_rate``, ``format_rate`` per step -> their means over
  the first and the last fifth of the steps (the learning signal of the issue);
* ``eval/results.json`` (eval stage): ``perplexity.{loss,perplexity}`` and ``code.{pass@k,format_rate}``.

A metrics file holds every attempt of a resumed stage (appended), so "first" is the first record and "last" the
last one. The summary goes to ``<run.dir>/summary.json`` and is printed as a table.
"""

from __future__ import annotations

import json
from pathlib import Path

from betterai_megatron.pipeline.pipeline_config import STAGES


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (missing file: none; a torn last line of a killed run is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def training_losses(metrics_path: Path) -> dict:
    """First/last train loss (with their steps) and first/last validation loss of a trainer's metrics.jsonl."""
    records = read_jsonl(metrics_path)
    train = [r for r in records if r.get("loss") is not None]
    valid = [r for r in records if r.get("val_loss") is not None]
    out: dict = {}
    if train:
        out.update(steps=train[-1]["step"], first_loss=train[0]["loss"], first_loss_step=train[0]["step"],
                   last_loss=train[-1]["loss"])
        tail = train[-max(1, len(train) // 10):]  # the last tenth: less noisy than one micro-batch's loss
        out["last_tenth_mean_loss"] = _mean([r["loss"] for r in tail])
    if valid:
        out.update(first_val_loss=valid[0]["val_loss"], first_val_step=valid[0]["step"],
                   last_val_loss=valid[-1]["val_loss"], last_val_step=valid[-1]["step"])
    return out


def grpo_rewards(metrics_path: Path) -> dict:
    """Mean reward, pass rate and format rate over the first and the last fifth of the GRPO steps."""
    records = [r for r in read_jsonl(metrics_path) if r.get("reward_mean") is not None]
    if not records:
        return {}
    fifth = max(1, len(records) // 5)
    out: dict = {"steps": len(records)}
    for key in ("reward_mean", "pass_rate", "format_rate"):
        out[f"{key}_first_fifth"] = _mean([r.get(key) for r in records[:fifth]])
        out[f"{key}_last_fifth"] = _mean([r.get(key) for r in records[-fifth:]])
    return out


def eval_results(results_path: Path) -> dict:
    if not results_path.exists():
        return {}
    results = json.loads(results_path.read_text())
    out: dict = {}
    for section in ("perplexity", "code"):
        for key, value in (results.get(section) or {}).items():
            out[f"{section}.{key}"] = value
    return out


def summarize(paths, records: dict) -> dict:
    """``{"stages": {name: status/timings}, "metrics": {stage: numbers}}`` for the run directory ``paths.root``."""
    stages = {}
    for name in STAGES:
        record = records.get(name)
        if record is None:
            continue
        stages[name] = {"status": record.status, "seconds": record.seconds, "cpu_seconds": record.cpu_seconds,
                        "finished_at": record.finished_at}
    metrics = {}
    for name in ("pretrain", "sft"):
        found = training_losses(paths.stage(name) / "metrics.jsonl")
        if found:
            metrics[name] = found
    found = grpo_rewards(paths.stage("grpo") / "metrics.jsonl")
    if found:
        metrics["grpo"] = found
    found = eval_results(paths.stage("eval") / "results.json")
    if found:
        metrics["eval"] = found
    return {"run_dir": str(paths.root), "stages": stages, "metrics": metrics}


def _shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_summary(summary: dict) -> str:
    """The summary as two text tables: stages (status, wall and CPU time), then metrics."""
    lines = ["", f"pipeline summary ({summary['run_dir']})", "",
             f" {'stage':<11}| {'status':<24}| {'wall s':>8} | {'CPU s':>8}",
             "-" * 12 + "+" + "-" * 25 + "+" + "-" * 10 + "+" + "-" * 10]
    total_wall = total_cpu = 0.0
    for name, row in summary["stages"].items():
        total_wall += row["seconds"] or 0.0
        total_cpu += row["cpu_seconds"] or 0.0
        wall = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        cpu = "-" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:.0f}"
        lines.append(f" {name:<11}| {row['status']:<24}| {wall:>8} | {cpu:>8}")
    lines.append(f" {'total':<11}| {'':<24}| {total_wall:>8.0f} | {total_cpu:>8.0f}")
    rows = [(stage, key, value) for stage, values in summary["metrics"].items() for key, value in values.items()]
    if rows:
        width = max(len(key) for _, key, _ in rows)
        lines += ["", f" {'stage':<9}| {'metric'.ljust(width)} | value", "-" * 10 + "+" + "-" * (width + 2) + "+"
                  + "-" * 12]
        lines += [f" {stage:<9}| {key.ljust(width)} | {_shown(value)}" for stage, key, value in rows]
    return "\n".join(lines)


def print_summary(summary: dict) -> None:
    print(format_summary(summary), flush=True)
