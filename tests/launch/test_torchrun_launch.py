"""examples/pretrain.sh (issue 3, "Launchers"): two torchrun nodes on one machine, the ``--no-python`` form, and
the launch line the script resolves from its environment.

Each real launch trains the tiny config at tp=2 for a few steps; its per-step losses must equal, bit for bit, those
of the same layout started by a plain ``torchrun --nproc-per-node 2 -m betterai_megatron`` (the same ranks doing the
same arithmetic), and every process must exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_CONFIG, free_port
from tests.launch.conftest import LAUNCH_TIMEOUT_S, TRAIN_OVERRIDES, launch_env, losses_by_step

PRETRAIN_SH = REPO / "examples" / "pretrain.sh"


def _finish(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str]]:
    """Wait for all processes; on a timeout kill their process groups (no stray torchrun left behind)."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout_s)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=launch_env(BETTERAI_DRY_RUN="1", **env))


@pytest.mark.distributed
def test_two_torchrun_nodes_match_single_node(tmp_path, reference_losses):
    run_dir = tmp_path / "two_nodes"
    port = str(free_port())
    procs = [
        subprocess.Popen(["bash", str(PRETRAIN_SH), str(TINY_CONFIG), f"run.dir={run_dir}", *TRAIN_OVERRIDES],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True,
                         env=launch_env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=port, NPROC_PER_NODE="1"))
        for node_rank in (0, 1)
    ]
    results = _finish(procs, LAUNCH_TIMEOUT_S)
    for node_rank, (returncode, out) in enumerate(results):
        assert returncode == 0, f"node {node_rank} exited {returncode}:\n{out[-4000:]}"
        assert (f"--nnodes 2 --node-rank {node_rank} --nproc-per-node 1 --master-addr 127.0.0.1 "
                f"--master-port {port}") in out, f"node {node_rank} did not print its torchrun line:\n{out[-2000:]}"
    assert losses_by_step(run_dir) == reference_losses


@pytest.mark.distributed
def test_torchrun_no_python_runs_the_script_per_rank(tmp_path, reference_losses):
    run_dir = tmp_path / "no_python"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python",
               str(PRETRAIN_SH), str(TINY_CONFIG), f"run.dir={run_dir}", *TRAIN_OVERRIDES]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=launch_env())
    [(returncode, out)] = _finish([proc], LAUNCH_TIMEOUT_S)
    assert returncode == 0, out[-4000:]
    # Under torchrun the script must exec the trainer directly, not start a second torchrun per rank.
    assert "launch (under torchrun, rank 0 of 2)" in out, out[-2000:]
    assert "torch.distributed.run --nnodes" not in out.split("launch (under torchrun", 1)[1]
    assert losses_by_step(run_dir) == reference_losses


def test_launch_line_defaults_to_one_node_and_the_visible_gpus():
    env = launch_env(BETTERAI_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1,2")
    del env["PYTHON"]  # the launcher's own choice of interpreter: the checkout's .venv when there is one
    result = subprocess.run(["bash", str(REPO / "examples" / "pretrain.sh"), str(TINY_CONFIG), "train.steps=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("launch (node 0 of 1): ")
    assert "-m torch.distributed.run --nnodes 1 --node-rank 0 --nproc-per-node 3 --master-addr 127.0.0.1" in line
    assert line.endswith(f"-m betterai_megatron pretrain --config {TINY_CONFIG} train.steps=2")
    expected_python = REPO / ".venv" / "bin" / "python"
    if expected_python.exists():
        assert f": {expected_python} -m torch.distributed.run" in line


def test_launch_line_uses_the_multi_node_environment():
    result = _dry_run("pretrain.sh", str(TINY_CONFIG), NNODES="4", NODE_RANK="3", MASTER_ADDR="node007",
                      MASTER_PORT="6000", NPROC_PER_NODE="8", TORCHRUN_ARGS="--max-restarts 0")
    assert result.returncode == 0, result.stderr
    assert ("--nnodes 4 --node-rank 3 --nproc-per-node 8 --master-addr node007 --master-port 6000 --max-restarts 0 "
            f"-m betterai_megatron pretrain --config {TINY_CONFIG}") in result.stdout


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_stage_scripts_share_the_launcher(stage):
    launched = _dry_run(f"{stage}.sh", str(TINY_CONFIG), "x.y=1", NPROC_PER_NODE="2")
    assert launched.returncode == 0, launched.stderr
    assert "--nproc-per-node 2 " in launched.stdout
    assert f"-m betterai_megatron {stage} --config {TINY_CONFIG} x.y=1" in launched.stdout
    direct = _dry_run(f"{stage}.sh", str(TINY_CONFIG), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert "torch.distributed.run" not in direct.stdout
    assert f"-m betterai_megatron {stage} --config {TINY_CONFIG}" in direct.stdout


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE='eight' must be a whole number"),
])
def test_bad_launch_environment_is_refused_with_its_name(env, message):
    result = _dry_run("pretrain.sh", str(TINY_CONFIG), **env)
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_config_is_refused():
    result = _dry_run("pretrain.sh", "no/such/config.yaml")
    assert result.returncode == 2
    assert "config file 'no/such/config.yaml' not found" in result.stderr
    usage = _dry_run("pretrain.sh")
    assert usage.returncode == 2 and "usage: pretrain.sh CONFIG" in usage.stderr
