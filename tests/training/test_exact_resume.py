"""Exact resume after ``kill -9`` (issue 3): every step after the resume has, bit for bit, the loss of the same step
in an uninterrupted run.

Two-process torchrun jobs on gloo, with dropout on (0.1) so that the RNG states matter:

* dense model at dp=2, synchronous saves every 2 steps, ``keep_last=2``;
* the same with the distributed optimizer (Adam state sharded over the two ranks, ``dp_reshardable`` format);
* MoE model at ep=2 (experts split over the two data-parallel ranks, whose expert RNG streams differ),
  asynchronous saves.

The reference runs 6 steps without saving anything. The victim runs the same config with checkpoints and is
stopped dead (SIGKILL to torchrun and every process below it) after step 5, which is never saved; the resumed
run must load the last *committed* checkpoint and reproduce the reference's losses from there on exactly.
"""

from __future__ import annotations

import pytest

from tests.training.launch import (
    kill_tree,
    logged_steps,
    losses,
    run,
    start,
    tracker,
    wait_until,
)

STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.tensorboard=false",
          "log.level=INFO", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
CASES = {
    "dense_dp2_sync": ["model.preset=tiny"],
    "dense_dp2_distributed_optimizer": ["model.preset=tiny", "parallel.distributed_optimizer=true"],
    "moe_ep2_async": ["model.preset=tiny-moe", "parallel.ep=2", "checkpoint.async_save=true"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_kill9_is_bit_exact(case, tmp_path):
    layout = COMMON + CASES[case]
    reference_dir = tmp_path / "reference"
    code, log = run(2, layout + [f"run.dir={reference_dir}", "checkpoint.save_on_exit=false"],
                    log=tmp_path / "reference.log")
    assert code == 0, log[-6000:]
    assert not (reference_dir / "checkpoints").exists(), "checkpointing off: nothing may be saved"
    reference = losses(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    checkpoints = tmp_path / "checkpoints"
    saving = layout + [f"checkpoint.dir={checkpoints}", "checkpoint.save_interval=2", "checkpoint.keep_last=2"]
    victim_log = tmp_path / "victim.log"
    victim = start(2, saving + [f"run.dir={tmp_path / 'victim'}"], log=victim_log,
                   faults={"stall_after_step": {"step": 5, "seconds": 600}})
    try:
        wait_until(lambda: 5 in logged_steps(tmp_path / "victim"), proc=victim, log=victim_log, what="step 5")
    finally:
        kill_tree(victim)  # kill -9: torchrun, both workers and any checkpoint writer processes
    assert victim.returncode != 0
    committed = tracker(checkpoints)
    assert committed in (2, 4), f"tracker after kill -9: {committed}\n{victim_log.read_text()[-3000:]}"
    if "async" not in case:
        assert committed == 4, "synchronous saves commit before the next step starts"

    resumed_dir = tmp_path / "resumed"
    code, log = run(2, saving + [f"run.dir={resumed_dir}"], log=tmp_path / "resumed.log")
    assert code == 0, log[-6000:]
    assert f"loaded checkpoint {checkpoints / f'iter_{committed:07d}'}" in log
    resumed = losses(resumed_dir)
    assert sorted(resumed) == list(range(committed + 1, STEPS + 1)), "the resumed run starts after the checkpoint"
    for step in resumed:
        assert resumed[step] == reference[step], (
            f"{case}: step {step} loss {resumed[step]!r} after resume != uninterrupted {reference[step]!r}")
    assert tracker(checkpoints) == STEPS
    kept = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000004", "iter_0000006"], f"keep_last=2 should leave the two newest: {kept}"
