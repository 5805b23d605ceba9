"""The pipeline's config checks, stage wiring and summary, in-process (no training): bad configs fail before any
stage runs with a message naming the key; each training stage starts from the right checkpoint; the summary's
numbers match hand-computed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from betterai_megatron import cli
from betterai_megatron.config import ConfigError, load_config
from betterai_megatron.pipeline.stages import StagePaths, previous_training_stage, stage_commands
from betterai_megatron.pipeline.summary import grpo_rewards, training_losses

REPO = Path(__file__).resolve().parents[2]
PIPELINE_CONFIG = REPO / "examples" / "configs" / "tiny_pipeline.yaml"


def test_unknown_stage_is_a_config_error_naming_the_key_and_the_closest_stage():
    with pytest.raises(ConfigError) as caught:
        load_config(PIPELINE_CONFIG, ["pipeline.stages=[data,tokenizer,pretrian]"])
    message = str(caught.value)
    assert "pipeline.stages" in message and "'pretrian'" in message
    assert "did you mean 'pretrain'" in message


def test_cli_unknown_stage_exits_2_before_creating_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = cli.main(["pipeline", "--config", str(PIPELINE_CONFIG), f"run.dir={run_dir}",
                       "pipeline.stages=[data,grpoo]"])
    assert status == 2
    err = capsys.readouterr().err
    assert "unknown stage 'grpoo'" in err and "did you mean 'grpo'" in err
    assert not run_dir.exists()


def test_bad_stage_override_fails_before_the_first_stage_runs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = cli.main(["pipeline", "--config", str(PIPELINE_CONFIG), f"run.dir={run_dir}",
                       "pipeline.sft_overrides=[train.stepz=3]"])
    assert status == 2
    err = capsys.readouterr().err
    assert "stage 'sft'" in err and "train.stepz" in err
    assert not (run_dir / "data").exists()  # nothing ran: the data stage is first


def test_eval_without_any_training_stage_is_refused(tmp_path, capsys):
    status = cli.main(["pipeline", "--config", str(PIPELINE_CONFIG), f"run.dir={tmp_path / 'run'}",
                       "pipeline.stages=[data,eval]"])
    assert status == 2
    assert "no checkpoint to evaluate" in capsys.readouterr().err


def _overrides(command) -> dict:
    return dict(o.split("=", 1) for o in command.overrides)


def test_each_training_stage_starts_from_the_previous_ones_weights(tmp_path):
    config = load_config(PIPELINE_CONFIG, [f"run.dir={tmp_path}"])
    paths = StagePaths(tmp_path)
    commands = stage_commands(config, "cfg.yaml", paths)
    pretrain, sft, grpo, evaluation = (_overrides(commands[s]) for s in ("pretrain", "sft", "grpo", "eval"))
    assert "checkpoint.load_dir" not in pretrain  # from scratch
    assert sft["checkpoint.load_dir"] == str(tmp_path / "pretrain" / "checkpoints")
    assert grpo["checkpoint.load_dir"] == str(tmp_path / "sft" / "checkpoints")
    assert sft["checkpoint.load_weights_only"] == grpo["checkpoint.load_weights_only"] == "true"
    assert evaluation["checkpoint.load_dir"] == str(tmp_path / "grpo" / "checkpoints")
    for name, overrides in (("pretrain", pretrain), ("sft", sft), ("grpo", grpo)):
        assert overrides["run.dir"] == str(tmp_path / name)
        assert overrides["checkpoint.dir"] == str(tmp_path / name / "checkpoints")
        assert overrides["data.tokenizer_model"] == str(tmp_path / "tokenizer" / "code.model")
    assert grpo["rollout.problems"] == str(tmp_path / "data" / "problems_train.jsonl")
    assert evaluation["eval.problems_path"] == str(tmp_path / "data" / "problems_eval.jsonl")


def test_a_stage_left_out_is_bridged_by_the_nearest_selected_or_complete_one(tmp_path):
    paths = StagePaths(tmp_path)
    assert previous_training_stage("grpo", selected=["pretrain", "grpo"], paths=paths) == "pretrain"
    assert previous_training_stage("grpo", selected=["grpo"], paths=paths) is None
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "COMPLETE").write_text("{}")
    assert previous_training_stage("grpo", selected=["grpo"], paths=paths) == "sft"
    assert previous_training_stage("eval", selected=["eval"], paths=paths) == "sft"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_losses_first_last_and_validation(tmp_path):
    records = [{"step": s, "loss": 10.0 - s} for s in range(1, 21)]
    records.insert(10, {"step": 10, "val_loss": 7.5})
    records.append({"step": 20, "val_loss": 2.5})
    found = training_losses(_write_jsonl(tmp_path / "m.jsonl", records))
    assert found["first_loss"] == 9.0 and found["first_loss_step"] == 1
    assert found["last_loss"] == -10.0 and found["steps"] == 20
    assert found["last_tenth_mean_loss"] == pytest.approx((-9.0 - 10.0) / 2)  # steps 19 and 20
    assert (found["first_val_loss"], found["last_val_loss"]) == (7.5, 2.5)


def test_grpo_first_and_last_fifth_means(tmp_path):
    records = [{"step": s, "reward_mean": s / 10, "pass_rate": 0.0 if s < 9 else 1.0, "format_rate": 0.5}
               for s in range(1, 11)]
    found = grpo_rewards(_write_jsonl(tmp_path / "m.jsonl", records))
    assert found["steps"] == 10
    assert found["reward_mean_first_fifth"] == pytest.approx(0.15)  # steps 1, 2
    assert found["reward_mean_last_fifth"] == pytest.approx(0.95)  # steps 9, 10
    assert found["pass_rate_first_fifth"] == 0.0 and found["pass_rate_last_fifth"] == 1.0
