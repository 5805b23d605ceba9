"""SIGTERM to torchrun itself (scancel, a pipeline being stopped, Ctrl-C on the launcher): the checkpoint the
trainer writes in answer is committed.

torchrun delivers SIGTERM to each worker's whole process group (``os.killpg``), so every process the trainer has
forked gets it too — including the manager process that serves dist_checkpointing's results queue. When that
manager died of the signal, the answering save failed with BrokenPipeError and the job lost the step it was
stopping at. torchrun itself still exits non-zero after a SIGTERM (it re-raises it); the workers' checkpoint is what
matters.
"""

from __future__ import annotations

import signal

import pytest

from tests.training.launch import logged_steps, start, tail, tracker, wait_until

OVERRIDES = ["train.steps=400", "checkpoint.save_interval=1", "log.interval=1", "log.tensorboard=false",
             "log.level=INFO", "train.micro_batch_size=2", "train.global_batch_size=4"]


@pytest.mark.distributed
def test_sigterm_to_torchrun_commits_the_answering_checkpoint(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    proc = start(2, [*OVERRIDES, f"run.dir={run_dir}"], log=log)
    wait_until(lambda: len(logged_steps(run_dir)) >= 3, proc=proc, log=log, what="three logged steps")
    proc.send_signal(signal.SIGTERM)  # torchrun, not a worker
    proc.wait(timeout=240)
    text = log.read_text()
    assert "BrokenPipeError" not in text, tail(log)
    assert "received SIGTERM: saved a checkpoint at step" in text, tail(log)
    saved_at = int(text.split("received SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
    assert tracker(run_dir / "checkpoints") == saved_at, "the answering checkpoint must be the committed one"
