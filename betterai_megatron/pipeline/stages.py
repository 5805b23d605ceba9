"""The full pipeline: tokenizer -> preprocessing -> pretrain -> SFT -> GRPO -> evaluation, one stage after another.

Each stage is the project's own CLI command run as a subprocess (under ``torchrun`` for the training stages), so
every stage starts from a clean process group and is exactly what a user would run by hand. Stage ``X`` works in
``<run.dir>/X/`` and is marked complete by ``<run.dir>/X/COMPLETE`` once its command exits 0; a re-run skips
complete stages, and an interrupted training stage resumes from its own checkpoint. Each training stage starts
from the previous stage's checkpoint (weights only, fresh optimiser).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from betterai_megatron.config import Config, to_dict
from betterai_megatron.pipeline.pipeline_config import STAGES, PipelineConfig

logger = logging.getLogger(__name__)



@dataclass
class StagePaths:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def tokenizer_model(self) -> Path:
        return self.root / "tokenizer" / "code.model"

    @property
    def data_prefix(self) -> Path:
        return self.root / "preprocess" / "pretrain"

    @property
    def indexed_prefix(self) -> Path:
        return Path(f"{self.data_prefix}_text_document")

    def checkpoints(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"


def _betterai(args: list[str], *, nproc: int | None) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "betterai_megatron", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", "betterai_megatron", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_commands(config: Config, config_path: str, paths: StagePaths) -> dict[str, list[str]]:
    """The command line of every stage (only what differs between stages is added to the shared config)."""
    p: PipelineConfig = config.pipeline
    data = paths.stage("data")
    tok = str(paths.tokenizer_model)
    shared = [f"data.tokenizer_model={tok}", "data.tokenizer_type=SentencePieceTokenizer", "data.mock=false",
              f"data.prefixes=[{paths.indexed_prefix}]"]

    def training(stage: str, previous: str | None, extra: list[str]) -> list[str]:
        args = [stage, "--config", config_path, *shared, f"run.dir={paths.stage(stage)}",
                f"checkpoint.dir={paths.checkpoints(stage)}"]
        if previous is not None:
            args += [f"checkpoint.load_dir={paths.checkpoints(previous)}", "checkpoint.load_weights_only=true"]
        return _betterai(args + extra, nproc=p.nproc)

    return {
        "tokenizer": _betterai(["train-tokenizer", "--input", str(data / "pretrain.jsonl"), "--model-prefix",
                                tok.removesuffix(".model"), "--vocab-size", str(p.tokenizer_vocab_size),
                                "--model-type", "bpe", "--seed", str(config.train.seed)], nproc=None),
        "preprocess": _betterai(["preprocess", "--input", str(data / "pretrain.jsonl"), "--output-prefix",
                                 str(paths.data_prefix), "--json-keys", "text", "--tokenizer-type",
                                 "SentencePieceTokenizer", "--tokenizer-model", tok, "--workers",
                                 str(p.preprocess_workers), "--append-eod"], nproc=None),
        "pretrain": training("pretrain", None, p.pretrain_overrides),
        "sft": training("sft", "pretrain", [f"data.sft.paths=[{data / 'sft.jsonl'}]", *p.sft_overrides]),
        "grpo": training("grpo", "sft", [f"rollout.problems_path={data / 'problems_train.jsonl'}",
                                         *p.grpo_overrides]),
        "eval": _betterai(["eval", "--config", config_path, *shared, f"run.dir={paths.stage('eval')}",
                           f"checkpoint.load_dir={paths.checkpoints('grpo')}",
                           f"eval.problems_path={data / 'problems_eval.jsonl'}", *p.eval_overrides],
                          nproc=p.nproc),
    }


def _write_demo_data(config: Config, paths: StagePaths) -> None:
    from betterai_megatron.pipeline.demo_data import DemoDataConfig, write_demo_data

    p: PipelineConfig = config.pipeline
    write_demo_data(paths.stage("data"), DemoDataConfig(levels=p.demo_levels, task_repeats=p.demo_task_repeats,
                                                        stdlib_max_bytes=p.demo_stdlib_max_bytes,
                                                        seed=config.train.seed))


def run_pipeline(config: Config, config_path: str) -> dict:
    """Run the configured stages in order, skipping complete ones; returns the summary."""
    paths = StagePaths(Path(config.run.dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(config, config_path, paths)
    timings = {}
    for stage in STAGES:
        if stage not in config.pipeline.stages:
            continue
        marker = paths.stage(stage) / "COMPLETE"
        if marker.exists():
            print(f"[pipeline] {stage}: complete, skipped", flush=True)
            continue
        paths.stage(stage).mkdir(parents=True, exist_ok=True)
        start = time.time()
        if stage == "data":
            print("[pipeline] data: writing the built-in corpus, SFT and problem sets", flush=True)
            _write_demo_data(config, paths)
        else:
            command = commands[stage]
            print(f"[pipeline] {stage}: {shlex.join(command)}", flush=True)
            log_path = paths.stage(stage) / "stage.log"
            with open(log_path, "a") as log:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if result.returncode != 0:
                tail = "".join(open(log_path).readlines()[-30:])
                raise RuntimeError(f"pipeline stage {stage!r} failed (exit {result.returncode}); log: "
                                   f"{log_path}\n{tail}")
        timings[stage] = time.time() - start
        marker.write_text(json.dumps({"seconds": timings[stage]}) + "\n")
        print(f"[pipeline] {stage}: done in {timings[stage]:.0f} s", flush=True)
    summary = summarize(paths)
    (paths.root / "summary.json").write_text(json.dumps({"stages": summary, "config": to_dict(config)},
                                                        indent=2))
    print_summary(summary)
    return summary


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(paths: StagePaths) -> dict:
    """Key numbers per stage from its metrics.jsonl / results.json."""
    summary: dict = {}
    for stage in ("pretrain", "sft"):
        records = [r for r in _metrics(paths.stage(stage) / "metrics.jsonl") if r.get("loss") is not None]
        if records:
            summary[stage] = {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                              "steps": records[-1]["step"]}
            vals = [r for r in _metrics(paths.stage(stage) / "metrics.jsonl") if r.get("val_loss") is not None]
            if vals:
                summary[stage]["val_loss"] = vals[-1]["val_loss"]
    grpo = [r for r in _metrics(paths.stage("grpo") / "metrics.jsonl") if r.get("reward_mean") is not None]
    if grpo:
        fifth = max(1, len(grpo) // 5)
        mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / len(rs)  # noqa: E731
        summary["grpo"] = {"steps": len(grpo),
                           "reward_first_fifth": mean(grpo[:fifth], "reward_mean"),
                           "reward_last_fifth": mean(grpo[-fifth:], "reward_mean"),
                           "pass_rate_first_fifth": mean(grpo[:fifth], "pass_rate"),
                           "pass_rate_last_fifth": mean(grpo[-fifth:], "pass_rate")}
    results = paths.stage("eval") / "results.json"
    if results.exists():
        summary["eval"] = json.loads(results.read_text())
    return summary


def print_summary(summary: dict) -> None:
    rows = []
    for stage, values in summary.items():
        for key, value in values.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    rows.append((stage, f"{key}.{sub}", v))
            else:
                rows.append((stage, key, value))
    width = max((len(r[1]) for r in rows), default=10)
    print("\n stage     | " + "metric".ljust(width) + " | value")
    print("-----------+-" + "-" * width + "-+----------")
    for stage, key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f" {stage:<9} | {key.ljust(width)} | {shown}")
