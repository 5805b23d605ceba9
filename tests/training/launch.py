"""Helpers for the checkpoint/preemption tests: real ``torchrun`` jobs of ``betterai pretrain`` on gloo that a test
can watch, signal and ``kill -9`` while they run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import REPO, TINY_CONFIG, free_port, read_metrics

TRACKER = "latest_checkpointed_iteration.txt"


def pretrain_command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "betterai_megatron", "pretrain", "--config",
            str(TINY_CONFIG), *overrides]


def job_env(faults: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("BETTERAI_FAULT_INJECTION", None)
    if faults:
        env["BETTERAI_FAULT_INJECTION"] = json.dumps(faults)
    return env


def start(nproc: int, overrides: list[str], *, log: Path, faults: dict | None = None) -> subprocess.Popen:
    """Launch in the background; stdout+stderr go to ``log``."""
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(pretrain_command(nproc, overrides), cwd=REPO, env=job_env(faults), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run(nproc: int, overrides: list[str], *, log: Path, faults: dict | None = None, timeout: float = 240):
    """Run to completion; returns (exit code, log text)."""
    proc = start(nproc, overrides, log=log, faults=faults)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"timed out after {timeout} s:\n{tail(log)}") from None
    return code, log.read_text()


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text()[-chars:] if log.exists() else "<no log>"


def wait_until(predicate, *, proc: subprocess.Popen, log: Path, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.1)


def worker_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The ``betterai pretrain`` processes torchrun started (torchrun puts each in its own session)."""
    children = psutil.Process(proc.pid).children(recursive=False)
    return [p for p in children if "betterai_megatron" in " ".join(p.cmdline())]


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal torchrun and every process below it at once (what a node failure does to a job)."""
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def logged_steps(run_dir: Path) -> set[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return set()
    steps = set()
    for line in path.read_text().splitlines():
        try:
            steps.add(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def tracker(checkpoint_dir: Path) -> int | None:
    path = Path(checkpoint_dir) / TRACKER
    return int(path.read_text()) if path.exists() else None
