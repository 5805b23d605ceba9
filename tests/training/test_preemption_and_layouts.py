"""Preemption and faults (issue 3), one chain of real torchrun jobs on a dense tiny model without dropout:

1. tp=2, saves every 2 steps, a crash (SIGKILL of rank 0) injected in the middle of saving step 4: the tracker
   still names step 2, the half-committed ``iter_0000004`` is left behind.
2. the same command resumes from step 2 (not 4); SIGTERM to *one* worker after step 3: both ranks stop after the
   same step, a checkpoint of it is committed, and the job exits 0.
3. that checkpoint resumes with another layout — tp=1 (1 process) and pp=2 — through dist_checkpointing's
   resharding (weights and Adam state), matching a single-process uninterrupted run to 1e-5.
4. it starts the next stage with ``checkpoint.load_weights_only``: trained weights, fresh schedule, step 0.

A single-process uninterrupted run is the reference throughout (layouts agree to ~1e-7 here, see
test_layout_equivalence; a restart with fresh Adam moments is ~1e-3 off, so 1e-5 tells them apart).
"""

from __future__ import annotations

import shutil
import signal
import time

import psutil
import pytest

from tests.training.launch import (
    kill_tree,
    losses,
    records,
    run,
    start,
    tracker,
    wait_until,
    worker_processes,
)

STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.tensorboard=false",
          "log.level=INFO", "model.preset=tiny", "model.num_layers=4"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs steps 1-2 of the chain once for the tests below; returns their directories and logs."""
    root = tmp_path_factory.mktemp("preemption")
    out = {"root": root}
    code, out["reference_log"] = run(1, COMMON + [f"run.dir={root / 'reference'}", "log.tensorboard=true",
                                                  "checkpoint.save_on_exit=false"], log=root / "reference.log")
    assert code == 0, out["reference_log"][-6000:]
    out["reference"] = losses(root / "reference")

    checkpoints = root / "checkpoints"
    tp2 = COMMON + ["parallel.tp=2", f"checkpoint.dir={checkpoints}", "checkpoint.save_interval=2"]
    out["crash_code"], out["crash_log"] = run(2, tp2 + [f"run.dir={root / 'crash'}"], log=root / "crash.log",
                                              faults={"crash_in_save": {"step": 4, "rank": 0}})
    time.sleep(1.0)
    crash_run = f"run.dir={root / 'crash'}"
    out["crash_survivors"] = [p.pid for p in psutil.process_iter(["cmdline"])
                              if crash_run in " ".join(p.info["cmdline"] or [])]
    out["tracker_after_crash"] = tracker(checkpoints)
    out["iter4_after_crash"] = (checkpoints / "iter_0000004").exists()

    log, release = root / "sigterm.log", root / "release"
    job = start(2, tp2 + [f"run.dir={root / 'sigterm'}"], log=log,
                faults={"stall_after_step": {"step": 3, "seconds": 300, "until_file": str(release)}})
    try:
        wait_until(lambda: 3 in losses_or_empty(root / "sigterm"), proc=job, log=log, what="step 3")
        rank1 = [w for w in worker_processes(job) if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1, f"expected one rank-1 worker under torchrun {job.pid}"
        rank1[0].send_signal(signal.SIGTERM)  # only rank 1: rank 0 must learn of it through the all-reduce
        release.touch()  # both ranks leave the stall and run step 4
        out["sigterm_code"] = job.wait(timeout=240)
    finally:
        if job.poll() is None:
            kill_tree(job)
    out["sigterm_log"] = log.read_text()
    out["checkpoints"] = checkpoints
    return out


def losses_or_empty(run_dir):
    try:
        return losses(run_dir)
    except (FileNotFoundError, ValueError):
        return {}


@pytest.mark.distributed
def test_crash_during_save_leaves_previous_checkpoint(chain):
    assert chain["crash_code"] != 0, "the injected SIGKILL must take the job down"
    assert "fault injection: killing rank 0 in the middle of saving step 4" in chain["crash_log"]
    assert chain["iter4_after_crash"], "the interrupted save had started writing iter_0000004"
    assert chain["tracker_after_crash"] == 2, "the tracker must still name the last complete checkpoint"
    assert chain["crash_survivors"] == [], "no helper process (checkpoint writer, results queue) may outlive it"


@pytest.mark.distributed
def test_resume_ignores_the_interrupted_save(chain):
    log = chain["sigterm_log"]
    assert f"loaded checkpoint {chain['checkpoints'] / 'iter_0000002'}: step 2" in log
    assert "ignoring incomplete checkpoint(s) [4]" in log
    resumed = losses(chain["root"] / "sigterm")
    assert min(resumed) == 3, "training continues at step 3"
    for step, loss in resumed.items():
        assert loss == pytest.approx(chain["reference"][step], rel=RTOL)


@pytest.mark.distributed
def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(chain):
    assert chain["sigterm_code"] == 0, chain["sigterm_log"][-6000:]
    # only rank 1 got the signal; rank 0 (which logs) learnt of it through the step's all-reduce
    assert "received a preemption signal (on another rank): saved a checkpoint at step 4; stopping" in \
        chain["sigterm_log"], chain["sigterm_log"][-4000:]
    assert tracker(chain["checkpoints"]) == 4, "signal after step 3 -> checkpoint of step 4, committed"
    assert sorted(losses(chain["root"] / "sigterm")) == [3, 4], "both ranks stopped after the same step"
    assert "Traceback" not in chain["sigterm_log"]


@pytest.mark.distributed
@pytest.mark.parametrize("name, nproc, layout", [("tp1", 1, []), ("pp2", 2, ["parallel.pp=2"])])
def test_resume_with_another_layout(chain, tmp_path, name, nproc, layout):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(chain["checkpoints"], checkpoints)
    code, log = run(nproc, COMMON + layout + [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={checkpoints}"],
                    log=tmp_path / "run.log")
    assert code == 0, log[-6000:]
    assert "saved with a different layout" in log and "optimizer state resharded" in log
    resumed = losses(tmp_path / "run")
    assert sorted(resumed) == [5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(chain["reference"][step], rel=RTOL), f"{name}: step {step}"


@pytest.mark.distributed
def test_load_weights_only_starts_the_next_stage(chain, tmp_path):
    code, log = run(1, COMMON + [f"run.dir={tmp_path / 'sft'}", "train.steps=2",
                                 f"checkpoint.load_dir={chain['checkpoints']}", "checkpoint.load_weights_only=true"],
                    log=tmp_path / "sft.log")
    assert code == 0, log[-6000:]
    assert "model weights only (fresh optimizer and schedule, step 0)" in log
    steps = records(tmp_path / "sft")
    reference = records(chain["root"] / "reference")
    assert sorted(steps) == [1, 2] and steps[1]["consumed_samples"] == 8, "step and data position restart"
    assert steps[1]["lr"] == reference[1]["lr"] == pytest.approx(1e-3 / 2), "fresh warmup (2 steps to 1e-3)"
    # the trained weights are in: batch 0 scores like the trained model did (~6.10), not like a fresh one (6.25)
    assert steps[1]["loss"] < reference[1]["loss"] - 0.05
    assert tracker(tmp_path / "sft" / "checkpoints") == 2
    assert tracker(chain["checkpoints"]) == 4, "the source checkpoint directory is only read"


@pytest.mark.distributed
def test_tensorboard_uses_megatron_names(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(chain["root"] / "reference" / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"lm loss", "learning-rate", "grad-norm", "batch-size", "iteration-time", "tokens-per-second",
                "throughput", "mfu", "mem-max-rss-bytes", "lm loss vs samples", "learning-rate vs samples"}
    assert expected <= tags, f"missing {sorted(expected - tags)}"
    loss_events = accumulator.Scalars("lm loss")
    assert [e.step for e in loss_events] == list(range(1, STEPS + 1))
    assert loss_events[0].value == pytest.approx(chain["reference"][1], rel=1e-6)
