"""Shared test fixtures: launching real ``torchrun`` jobs of the ``betterai`` CLI on gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_betterai(args: list[str], *, nproc: int = 1, timeout: float = 300, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``betterai ARGS`` under ``torchrun --nproc-per-node nproc`` (gloo, random port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "betterai_megatron", *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"betterai {' '.join(args)} (nproc={nproc}) failed with {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_torchrun_worker(script: str | Path, *, nproc: int, timeout: float) -> str:
    """Run a test file as its own ``torchrun --nproc-per-node nproc`` worker script (gloo, random port); its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def tiny_config() -> Path:
    return TINY_CONFIG


@pytest.fixture(autouse=True)
def _no_rendezvous_leak():
    """Fail the test that leaves MASTER_PORT/MASTER_ADDR in this process's environment.

    Child processes (torchrun jobs, worker scripts) inherit os.environ; a port this process still listens on makes
    them fail with EADDRINUSE far from the test that leaked it.
    """
    before = {k: os.environ.get(k) for k in ("MASTER_PORT", "MASTER_ADDR")}
    yield
    after = {k: os.environ.get(k) for k in ("MASTER_PORT", "MASTER_ADDR")}
    assert after == before, f"test leaked rendezvous variables into os.environ: {before} -> {after}"
