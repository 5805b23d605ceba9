"""Fixtures for the launcher tests: the 2-rank reference run and a real single-node Slurm cluster.

The reference is ``betterai pretrain`` under a plain ``torchrun --nproc-per-node 2`` (tests/conftest.py's
``run_betterai``, which does not touch examples/), so every launcher path is compared with a run that does not
share the code under test. The Slurm cluster is started by scripts/local_slurm.sh in a fresh temporary directory
once per module and stopped (jobs cancelled, daemons ended, directory removed) afterwards — also when the test
process dies without cleaning up (the script's owner-pid watchdog).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG, read_metrics, run_betterai

STEPS = 4
# tp=2: a layout that needs both ranks to talk at every layer, so a wrong rank/world wiring cannot pass.
TRAIN_OVERRIDES = [f"train.steps={STEPS}", "parallel.tp=2", "log.tensorboard=false", "log.level=WARNING"]
LAUNCH_TIMEOUT_S = 600  # generous: a shared 2-core box can be many times slower than an idle one
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"


def launch_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus any launcher variables, plus quiet, single-threaded workers."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                        "NNODES", "NODE_RANK", "NPROC_PER_NODE", "BETTERAI_FAULT_INJECTION")}
    # the launchers run the interpreter that runs these tests (else they would look for the checkout's .venv)
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """{step: loss} from metrics.jsonl; a step logged twice (a resume that repeated work) is an error."""
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {run_dir}/metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the tiny config at tp=2 under a single plain torchrun with 2 ranks."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_betterai(["pretrain", "--config", str(TINY_CONFIG), f"run.dir={run_dir}", *TRAIN_OVERRIDES], nproc=2,
                 env={"PYTHONWARNINGS": "ignore"}, timeout=LAUNCH_TIMEOUT_S)
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # A run that logged null/NaN losses would make every comparison below vacuous.
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses.values()), losses
    assert len(set(losses.values())) == STEPS, f"the reference losses should differ from step to step: {losses}"
    return losses


def _slurm_missing() -> str | None:
    missing = [tool for tool in ("sbatch", "scontrol", "squeue", "scancel")
               if shutil.which(tool) is None]
    missing += [daemon for daemon in ("munged", "slurmctld", "slurmd")
                if shutil.which(daemon) is None and not Path("/usr/sbin", daemon).exists()]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge, "
                "or scripts/setup_system.sh")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (munged runs as user munge, slurmd runs job steps)"
    return None


class LocalSlurm:
    """Client side of the cluster: the environment that points sbatch & co. at it, and job helpers."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.conf = directory / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return launch_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, check=check, timeout=60)

    def job_ids(self, name: str | None = None) -> list[str]:
        args = ["squeue", "-h", "-o", "%i"] + (["-n", name] if name else [])
        return self.run(*args).stdout.split()

    def wait_for_job_id(self, name: str, *, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ids = self.job_ids(name)
            if ids:
                return ids[0]
            time.sleep(0.2)
        raise AssertionError(f"no job named {name} appeared in squeue within {timeout_s} s")

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.directory / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def local_slurm():
    """A running single-node Slurm cluster in a fresh temporary directory (stopped and removed afterwards).

    Missing Slurm is a failure in CI (CI=true) — the launcher tests must not silently vanish there — and a skip
    elsewhere.
    """
    problem = _slurm_missing()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    # A short path: munge's unix socket lives inside it (sun_path holds 108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="betterai-slurm-"))
    # The owner pid makes the cluster stop by itself should this test process die without running the finaliser.
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(directory)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "LOCAL_SLURM_OWNER_PID": str(os.getpid())})
    cluster = LocalSlurm(directory)
    try:
        assert started.returncode == 0, f"local Slurm did not start:\n{started.stderr}\n{cluster.log_tail()}"
        yield cluster
    finally:
        # `stop` cancels the cluster's jobs and waits for them, then ends the daemons and removes the directory.
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(directory)], timeout=180, check=False)
        shutil.rmtree(directory, ignore_errors=True)
