"""examples/slurm/pretrain.sbatch on a real single-node Slurm cluster (issue 3, "Launchers").

The job runs two torchrun agents (``--ntasks-per-node=2``, one worker each) on the one node, so the multi-node
wiring — NNODES from the task count, NODE_RANK from SLURM_PROCID, the master from ``scontrol show hostnames`` —
is exercised for real. Losses must equal the plain 2-rank torchrun reference bit for bit.

The requeue test (one torchrun agent with both ranks) plays the time-limit warning of
``#SBATCH --signal=B:USR1@120`` with ``scancel --signal=USR1 --batch`` (the same delivery: SIGUSR1 to the batch
shell only) while the trainer is held after step 2 by its fault-injection stall (which ends when the signal
arrives); the job must checkpoint at step 3, requeue itself, resume from that checkpoint in its second run and
finish: every step logged exactly once, losses equal to the uninterrupted reference.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import REPO, TINY_CONFIG, free_port, read_metrics
from tests.launch.conftest import LAUNCH_TIMEOUT_S, STEPS, TRAIN_OVERRIDES, losses_by_step

SBATCH = REPO / "examples" / "slurm" / "pretrain.sbatch"
STALL_AFTER_STEP = 2
# The window in which the test sends SIGUSR1: the stall ends as soon as the trainer has the signal, so this is
# only a cap; the trainer then runs step 3, saves and stops.
STALL_S = 300

pytestmark = pytest.mark.distributed


def _submit(local_slurm, *, name: str, run_dir, out_file, tasks: int, workers_per_task: int,
            extra_env: dict | None = None) -> subprocess.Popen:
    """``sbatch --wait`` the pretrain script as ``tasks`` torchrun agents of ``workers_per_task`` on the node."""
    command = ["sbatch", "--wait", "--nodes=1", f"--ntasks-per-node={tasks}", f"--job-name={name}",
               f"--output={out_file}", "--time=15", str(SBATCH), str(TINY_CONFIG), *TRAIN_OVERRIDES]
    env = local_slurm.env(MASTER_PORT=str(free_port()), RUN_DIR=str(run_dir), NPROC_PER_NODE=str(workers_per_task),
                          **(extra_env or {}))
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, local_slurm, name: str, out_file) -> tuple[int, str]:
    try:
        proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for job_id in local_slurm.job_ids(name):
            local_slurm.run("scancel", "--full", job_id, check=False)
        proc.kill()
        proc.communicate()
        raise AssertionError(f"job {name} did not finish in {LAUNCH_TIMEOUT_S} s:\n{_read(out_file)[-4000:]}")
    return proc.returncode, _read(out_file)


def _read(path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def test_sbatch_two_agents_train_to_the_reference(local_slurm, tmp_path, reference_losses):
    run_dir, out_file = tmp_path / "run", tmp_path / "job.out"
    proc = _submit(local_slurm, name="betterai-test-sbatch", run_dir=run_dir, out_file=out_file, tasks=2,
                   workers_per_task=1)
    returncode, out = _wait(proc, local_slurm, "betterai-test-sbatch", out_file)
    assert returncode == 0, f"the job failed (sbatch --wait exit {returncode}):\n{out[-4000:]}\n{local_slurm.log_tail()}"
    for node_rank in (0, 1):
        assert f"launch (node {node_rank} of 2)" in out, out[-3000:]
    assert "--master-addr " in out and "run 0: 2 torchrun agents" in out
    assert losses_by_step(run_dir) == reference_losses
    assert "requeue" not in out.lower().replace("--requeue", ""), "a job that was not signalled must not requeue"


def _wait_for_step(run_dir, step: int, proc: subprocess.Popen, out_file, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(r.get("step") == step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before step {step}:\n{_read(out_file)[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not logged within {timeout_s} s:\n{_read(out_file)[-4000:]}")


def test_usr1_before_time_limit_checkpoints_requeues_and_resumes(local_slurm, tmp_path, reference_losses):
    checkpointing = REPO / "betterai_megatron" / "training" / "checkpointing.py"
    if not checkpointing.exists():
        pytest.skip("trainer checkpointing (betterai_megatron/training/checkpointing.py) has not landed")
    name = "betterai-test-requeue"
    run_dir, out_file = tmp_path / "run", tmp_path / "job.out"
    stall = {"stall_after_step": {"step": STALL_AFTER_STEP, "seconds": STALL_S}}
    # One torchrun agent with both ranks this time (the other test has two agents of one rank each).
    proc = _submit(local_slurm, name=name, run_dir=run_dir, out_file=out_file, tasks=1, workers_per_task=2,
                   extra_env={"BETTERAI_FAULT_INJECTION": json.dumps(stall)})
    job_id = local_slurm.wait_for_job_id(name)
    _wait_for_step(run_dir, STALL_AFTER_STEP, proc, out_file, LAUNCH_TIMEOUT_S)
    # What `#SBATCH --signal=B:USR1@120` does near the time limit: SIGUSR1 to the batch shell only.
    local_slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    returncode, out = _wait(proc, local_slurm, name, out_file)

    assert returncode == 0, f"the requeued job did not succeed (exit {returncode}):\n{out[-5000:]}"
    assert "SIGUSR1 (time limit near)" in out and f"requeueing job {job_id}" in out, out[-4000:]
    assert f"job {job_id} ({name}) run 1:" in out, f"the job did not run a second time:\n{out[-4000:]}"
    second_run = out.split(f"job {job_id} ({name}) run 1:", 1)[1]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"iter_{STALL_AFTER_STEP + 1:07d}").is_dir(), sorted(p.name for p in checkpoints.iterdir())
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    # Each step exactly once across both runs (losses_by_step rejects repeats): the second run started at step 4,
    # and its numbers are those of the uninterrupted reference.
    assert losses_by_step(run_dir) == reference_losses
    assert "fault injection: stalling" not in second_run, "the second run trained step 2 again"
