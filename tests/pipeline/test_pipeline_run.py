"""Real pipeline runs (``betterai pipeline`` subprocesses, real torchrun training on gloo) with a tiny config:
a re-run skips complete stages without starting any process for them; a training stage interrupted by SIGTERM is
not marked complete, and the next run resumes it from its checkpoint instead of starting over."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Small enough for seconds per stage: a 2-layer 64-wide model, 32-token sequences, a few hundred tasks' worth of data.
TINY_PIPELINE = """\
model: {preset: tiny, vocab_size: 512}
train: {seed: 7, micro_batch_size: 2, global_batch_size: 2, seq_length: 32, lr: 1.0e-3, lr_warmup_steps: 0}
data: {tokenizer_type: SentencePieceTokenizer, split: "90,10,0"}
log: {interval: 1, tensorboard: false, level: WARNING}
pipeline:
  tokenizer_vocab_size: 512
  preprocess_workers: 1
  demo_levels: [1]
  demo_task_repeats: 1
  demo_stdlib_max_bytes: 20000
"""
PREP_STAGES = ["data", "tokenizer", "preprocess"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _pipeline_args(config: Path, run_dir: Path, stages: list[str], *overrides: str) -> list[str]:
    return [sys.executable, "-m", "betterai_megatron", "pipeline", "--config", str(config), f"run.dir={run_dir}",
            f"pipeline.stages=[{','.join(stages)}]", *overrides]


def _run(args: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under run_dir except the per-invocation ones."""
    skip = {"pipeline_config.yaml", "summary.json"}
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir with the data, tokenizer and preprocess stages complete): copied by each test."""
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "tiny_pipeline.yaml"
    config.write_text(TINY_PIPELINE)
    run_dir = root / "prepared"
    result = _run(_pipeline_args(config, run_dir, PREP_STAGES))
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in PREP_STAGES:
        assert (run_dir / stage / "COMPLETE").exists()
    return config, run_dir


def test_rerun_skips_complete_stages_and_starts_no_process(prepared, tmp_path):
    config, prepared_dir = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(prepared_dir, run_dir)
    stages = [*PREP_STAGES, "pretrain"]
    first = _run(_pipeline_args(config, run_dir, stages, "pipeline.pretrain_overrides=[train.steps=2]"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pretrain: done" in first.stdout
    marker = json.loads((run_dir / "pretrain" / "COMPLETE").read_text())
    assert marker["seconds"] > 0 and marker["config"]["train.steps"] == 2
    assert (run_dir / "pretrain" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    before = _snapshot(run_dir)

    second = _run(_pipeline_args(config, run_dir, stages, "pipeline.pretrain_overrides=[train.steps=2]"))
    assert second.returncode == 0, second.stdout + second.stderr
    for stage in stages:
        assert f"[pipeline] {stage}: complete (finished " in second.stdout
    assert f"[pipeline] pretrain: complete (finished {marker['finished_at']}), skipped" in second.stdout
    assert "torch.distributed.run" not in second.stdout  # no stage command was even printed
    # every file of every stage untouched: markers, checkpoints, metrics, and stage.log (each started stage
    # process appends a header line to it)
    assert _snapshot(run_dir) == before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {s: summary["stages"][s]["status"] for s in stages} == dict.fromkeys(stages, "skipped")
    assert summary["metrics"]["pretrain"]["steps"] == 2

    # a changed stage config is not silently re-run, but named
    third = _run(_pipeline_args(config, run_dir, stages, "pipeline.pretrain_overrides=[train.steps=3]"))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "its config changed since (train.steps)" in third.stdout
    assert _snapshot(run_dir) == before


def _wait_for(predicate, *, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"pipeline exited early ({process.returncode}): {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the stage")
        time.sleep(0.5)


def test_interrupted_training_stage_is_not_complete_and_resumes_from_its_checkpoint(prepared, tmp_path):
    config, prepared_dir = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(prepared_dir, run_dir)
    stages = [*PREP_STAGES, "pretrain"]
    overrides = ("pipeline.pretrain_overrides=[train.steps=4,checkpoint.save_interval=2]",)
    tracker = run_dir / "pretrain" / "checkpoints" / "latest_checkpointed_iteration.txt"
    # the trainer sleeps after saving step 2 (until a preemption signal): a deterministic moment to interrupt
    stall = json.dumps({"stall_after_step": {"step": 2, "seconds": 300}})
    process = subprocess.Popen(_pipeline_args(config, run_dir, stages, *overrides), cwd=REPO,
                               env=_env(BETTERAI_FAULT_INJECTION=stall), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: tracker.exists() and tracker.read_text().strip() == "2", timeout=240, process=process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert "interrupted by SIGTERM during stage 'pretrain'" in err
    assert not (run_dir / "pretrain" / "COMPLETE").exists()
    interrupted_at = int(tracker.read_text())  # the trainer saves when it stops on SIGTERM: step 2 or 3
    assert interrupted_at in (2, 3)
    assert _train_steps(run_dir) == list(range(1, interrupted_at + 1))

    resumed = _run(_pipeline_args(config, run_dir, stages, *overrides))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "pretrain: incomplete from an earlier run" in resumed.stdout
    assert (run_dir / "pretrain" / "COMPLETE").exists()
    assert tracker.read_text().strip() == "4"
    # both attempts append to metrics.jsonl: a resumed run continues the step count, a restart would repeat 1, 2
    assert _train_steps(run_dir) == [1, 2, 3, 4]


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]
