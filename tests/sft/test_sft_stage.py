"""``betterai sft`` end to end: pretrain a tiny model a few steps, then SFT from its checkpoint at tp=2 (torchrun).

What is checked against independent references:

* the SFT run starts from the pretrained weights: its first-step loss (computed before the first update) equals
  the masked cross-entropy of the same first global batch computed by ``reference_worker.py`` from the
  pretraining checkpoint at tp=1 with plain torch — and differs from the loss of the fresh initialisation;
* weights only: fresh optimiser and warm-up schedule, step and data position start at 0;
* it saves under its own stage directory and leaves the pretraining checkpoint untouched;
* missing inputs fail before any model is built, naming their keys; ``examples/configs/tiny_sft.yaml`` is
  consistent with the tiny pretraining config it starts from.

The loss mask itself (assistant tokens only, on hand-built conversations, also after packing) is covered by
tests/data/test_chat_template.py and tests/data/test_sft_dataset.py; the reference loss here uses the dataset's
mask, so this test checks that the trainer applies it (a loss over all tokens would differ).
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_betterai
from tests.sft.stage_fixtures import (
    SFT_CONFIG,
    build_corpus,
    data_overrides,
    pretrain,
    run_reference,
    tracker,
)

SFT_STEPS = 2
SFT_SEQ_LENGTH = 128


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_stage")
    paths = build_corpus(root)
    paths["checkpoints"] = pretrain(paths, root / "pretrain")
    paths["root"] = root
    return paths


def sft_overrides(paths: dict, run_dir) -> list[str]:
    return [*data_overrides(paths), f"data.sft.paths=[{paths['sft']}]", "data.sft.builtin_if_missing=false",
            f"checkpoint.load_dir={paths['checkpoints']}", f"run.dir={run_dir}", f"train.steps={SFT_STEPS}",
            f"train.seq_length={SFT_SEQ_LENGTH}", "train.eval_interval=null", "log.interval=1",
            "log.tensorboard=false"]


@pytest.mark.distributed
def test_sft_at_tp2_starts_from_the_pretrained_weights(pretrained, tmp_path):
    run_dir = tmp_path / "sft"
    overrides = sft_overrides(pretrained, run_dir)
    result = run_betterai(["sft", "--config", str(SFT_CONFIG), *overrides, "parallel.tp=2", "log.level=INFO"],
                          nproc=2, timeout=300)
    log = result.stdout + result.stderr
    assert "model weights only (fresh optimizer and schedule, step 0)" in log

    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(records) == list(range(1, SFT_STEPS + 1))
    assert records[1]["consumed_samples"] == 8, "the data position restarts at 0"
    assert records[1]["lr"] == pytest.approx(5e-4 / 4), "a fresh warm-up (tiny_sft.yaml: 4 steps to 5e-4)"

    reference = run_reference(tmp_path, {"config": str(SFT_CONFIG), "overrides": overrides,
                                         "checkpoint": str(pretrained["checkpoints"]), "sft_loss": True})
    assert records[1]["loss"] == pytest.approx(reference["sft_loss"], rel=2e-5)
    assert abs(reference["sft_loss"] - reference["sft_loss_fresh"]) > 1e-3, \
        "the reference must tell pretrained from fresh weights"

    assert tracker(run_dir / "checkpoints") == SFT_STEPS, "saved under the SFT run's own directory"
    assert tracker(pretrained["checkpoints"]) == 3, "the pretraining checkpoint is only read"
    assert not (pretrained["checkpoints"] / f"iter_{SFT_STEPS:07d}").exists()


def test_missing_inputs_are_named_before_any_model_is_built(tmp_path):
    from betterai_megatron.config import ConfigError, load_config
    from betterai_megatron.training.sft import check_sft_inputs

    config = load_config(SFT_CONFIG, [f"data.sft.paths=[{tmp_path / 'nope.jsonl'}]",
                                      f"data.tokenizer_model={tmp_path / 'nope.model'}",
                                      "data.sft.builtin_if_missing=false", f"run.dir={tmp_path / 'run'}",
                                      f"checkpoint.load_dir={tmp_path / 'no_checkpoint'}"])
    with pytest.raises(ConfigError) as caught:
        check_sft_inputs(config)
    message = str(caught.value)
    assert f"data.sft.paths: {tmp_path / 'nope.jsonl'} does not exist" in message
    assert f"data.tokenizer_model={tmp_path / 'nope.model'} does not exist" in message
    assert f"checkpoint.load_dir={tmp_path / 'no_checkpoint'}: no latest_checkpointed_iteration.txt" in message


def test_tiny_sft_config_matches_the_tiny_pretraining_config():
    from betterai_megatron.config import load_config
    from tests.conftest import TINY_CONFIG

    sft, pre = load_config(SFT_CONFIG), load_config(TINY_CONFIG)
    assert sft.model == pre.model, "tiny_sft.yaml must build the model tiny_cpu.yaml pretrains"
    assert sft.checkpoint.load_dir == f"{pre.run.dir}/checkpoints" and sft.checkpoint.load_weights_only
    assert sft.run.dir != pre.run.dir and sft.data.sft.builtin_if_missing
