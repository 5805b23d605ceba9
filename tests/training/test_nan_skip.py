"""NaN/Inf steps (issue 3): skipped, counted and logged; training continues; after ``train.max_skipped_steps``
consecutive skips the run stops with an error naming the step and the rank.

A dp=2 job where the fault-injection hook makes rank 1's loss NaN at steps 2, 4 and 5 (so its gradients are NaN
too, and reach rank 0 through the data-parallel all-reduce), with ``train.max_skipped_steps=2``: step 2 is
skipped, step 3 trains again, steps 4 and 5 are two skips in a row, so the job stops at step 5.
"""

from __future__ import annotations

import math

import pytest

from tests.training.launch import records, run

WARMUP_LR = 1e-3 / 2  # lr after 1 of 2 warmup steps (linear warmup to train.lr=1e-3)


@pytest.mark.distributed
def test_nan_steps_are_skipped_then_fatal(tmp_path):
    code, log = run(2, ["train.steps=8", "train.micro_batch_size=2", "train.global_batch_size=8", "model.preset=tiny",
                        "log.tensorboard=false", "log.level=INFO", f"run.dir={tmp_path / 'run'}",
                        "train.max_skipped_steps=2", "checkpoint.save_on_exit=false"],
                    log=tmp_path / "run.log", faults={"nan_loss": {"steps": [2, 4, 5], "ranks": [1]}})
    assert code != 0, "two consecutive NaN steps with max_skipped_steps=2 must stop the run"
    assert "step 5: non-finite loss on rank(s) [1]" in log and "train.max_skipped_steps=2" in log, log[-4000:]
    assert "step 2: non-finite loss on rank(s) [1]" in log and "update skipped (1 in a row, 1 in total)" in log

    steps = records(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert [steps[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert steps[2]["skipped"] and steps[2]["grad_norm"] is None and steps[2]["loss"] is None  # NaN -> null
    assert not steps[3]["skipped"] and math.isfinite(steps[3]["loss"]) and math.isfinite(steps[3]["grad_norm"])
    # a skipped step does not advance the schedule: step 2 keeps step 1's warmup lr, step 3 takes the next one
    assert steps[1]["lr"] == steps[2]["lr"] == pytest.approx(WARMUP_LR)
    assert steps[3]["lr"] == pytest.approx(1e-3)
