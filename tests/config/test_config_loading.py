"""Config loading: strict YAML, dotted overrides, presets, and errors that name keys, types and values."""

from __future__ import annotations

import pytest

from betterai_megatron.config import ConfigError, load_config, validate_layout
from tests.conftest import TINY_CONFIG


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_win_over_file_and_preset():
    config = load_config(TINY_CONFIG, ["train.steps=5", "parallel.tp=2", "model.num_layers=4"])
    assert config.train.steps == 5 and config.parallel.tp == 2 and config.model.num_layers == 4
    assert config.model.hidden_size == 64  # from the tiny preset


def test_override_values_are_typed_as_yaml():
    config = load_config(TINY_CONFIG, ["train.lr=3e-4", "parallel.vpp=null", "model.nope_layers=[2]"])
    assert config.train.lr == pytest.approx(3e-4) and config.parallel.vpp is None
    assert config.model.nope_layers == [2]


def test_unknown_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_config(TINY_CONFIG, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"'model.moe.num_exprts'; did you mean 'model.moe.num_experts'"):
        load_config(_write(tmp_path, "model:\n  moe:\n    num_exprts: 4\n"))


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(TINY_CONFIG, ["trian.steps=3"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'many'"):
        load_config(TINY_CONFIG, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model.qk_layernorm: expected bool"):
        load_config(TINY_CONFIG, ["model.qk_layernorm=3"])
    with pytest.raises(ConfigError, match=r"model.normalization: expected one of 'RMSNorm' \| 'LayerNorm'.*"
                                          r"did you mean 'RMSNorm'"):
        load_config(TINY_CONFIG, ["model.normalization=RMSnorm"])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'steps' at line 3"):
        load_config(_write(tmp_path, "train:\n  steps: 1\n  steps: 2\n"))


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"model.preset='huge' is not a preset; choose one of \['code-1b'"):
        load_config(TINY_CONFIG, ["model.preset=huge"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=3"], r"model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["model.num_query_groups=2", "parallel.tp=4"], r"model.num_query_groups=2 is not divisible by parallel.tp=4"),
        (["parallel.pp=3"], r"model.num_layers=2 is not divisible by parallel.pp\*parallel.vpp=3\*1"),
        (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=3"],
         r"model.num_layers=4 is not divisible by parallel.pp\*parallel.vpp=2\*3"),
        (["model.preset=tiny-moe", "parallel.ep=3"], r"model.moe.num_experts=4 is not divisible by parallel.ep=3"),
        (["parallel.ep=2"], r"parallel.ep=2 needs an MoE model"),
        (["model.preset=tiny-moe", "parallel.tp=2", "parallel.sequence_parallel=false"],
         r"megatron-core requires sequence parallelism for MoE with parallel.tp=2"),
        (["model.fp8=hybrid"], r"model.fp8=hybrid: FP8 needs Transformer Engine on a CUDA GPU"),
        (["parallel.cp=2", "parallel.cp_attention=te"], r"parallel.cp=2 with parallel.cp_attention=te needs Transformer"),
        (["model.layer_pattern=GGXA"], r"model.layer_pattern='GGXA': letters must be from A"),
        (["train.global_batch_size=7"], r"train.global_batch_size=7 is not divisible by train.micro_batch_size=2"),
        (["train.lr=1e-4", "train.min_lr=2e-4"], r"train.min_lr=0.0002 is above train.lr=0.0001"),
    ],
)
def test_invalid_static_layouts_fail_with_keys_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, overrides)


def test_all_problems_are_reported_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, ["parallel.tp=3", "parallel.pp=3"])
    assert "parallel.tp=3" in str(info.value) and "parallel.pp*parallel.vpp=3*1" in str(info.value)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.tp=2"], 3, r"world size 3 is not divisible by parallel.tp\*parallel.pp\*parallel.cp=2\*1\*1=2"),
        ([], 3, r"train.global_batch_size=8 is not divisible by train.micro_batch_size\*data_parallel=2\*3"),
        (["model.preset=tiny-moe", "parallel.ep=4", "parallel.tp=2"], 4,
         r"world size 4 is not divisible by parallel.etp\*parallel.ep\*parallel.pp=2\*4\*1"),
        (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=6"], 2,
         r"interleaved pipeline \(parallel.vpp=2\) needs the number of micro-batches \(3\) to be a multiple"),
    ],
)
def test_invalid_world_layouts_fail_before_building(overrides, world_size, message):
    config = load_config(TINY_CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        validate_layout(config, world_size)


def test_moe_with_tp_switches_sequence_parallel_on():
    from betterai_megatron.model.transformer_config import sequence_parallel_enabled

    config = load_config(TINY_CONFIG, ["model.preset=tiny-moe", "parallel.tp=2"])
    assert sequence_parallel_enabled(model=config.model, parallel=config.parallel)
    dense = load_config(TINY_CONFIG, ["parallel.tp=2"])
    assert not sequence_parallel_enabled(model=dense.model, parallel=dense.parallel)


def test_nope_interval_becomes_megatron_no_rope_pattern():
    from betterai_megatron.model.transformer_config import no_rope_pattern

    config = load_config(TINY_CONFIG, ["model.num_layers=8", "model.nope_layer_interval=4"])
    assert no_rope_pattern(config.model) == [0, 0, 0, 1, 0, 0, 0, 1]
    config = load_config(TINY_CONFIG, ["model.num_layers=4", "model.nope_layers=[1,3]"])
    assert no_rope_pattern(config.model) == [1, 0, 1, 0]


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from betterai_megatron.cli import main

    assert main(["pretrain", "--config", str(TINY_CONFIG), "parallel.tp=3"]) == 2
    assert "model.num_attention_heads=4 is not divisible by parallel.tp=3" in capsys.readouterr().err
