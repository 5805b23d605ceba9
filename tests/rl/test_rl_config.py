"""GRPOLossConfig validation: bad values fail at construction with the dotted key and the valid names."""

import pytest

from betterai_megatron.rl.algo_config import GRPOLossConfig
from betterai_megatron.rl.registry import Registry


def test_defaults_are_dapo_style_and_need_no_reference_model():
    config = GRPOLossConfig()
    assert (config.advantage_estimator, config.loss_agg_mode) == ("grpo", "token-mean")
    assert (config.clip_low, config.clip_high, config.kl_coef) == (0.2, 0.28, 0.0)
    assert not config.needs_reference_model
    assert GRPOLossConfig(kl_coef=0.01).needs_reference_model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"advantage_estimator": "dr-grpo"},
            (
                r"grpo\.advantage_estimator: unknown advantage estimator 'dr-grpo' \(did you mean 'dr_grpo'\?\); "
                r"valid names: 'dr_grpo', 'grpo', 'rloo'"
            ),
        ),
        ({"loss_agg_mode": "seq-mean"}, r"grpo\.loss_agg_mode: unknown loss aggregation mode 'seq-mean'"),
        ({"kl_estimator": "low_var_kl"}, r"grpo\.kl_estimator: unknown KL estimator 'low_var_kl'.*'k3'"),
        ({"tree_prefix_weighting": "twice"}, r"grpo\.tree_prefix_weighting: unknown value 'twice'; valid values"),
        ({"tree_advantage_mode": "x"}, r"grpo\.tree_advantage_mode"),
        ({"clip_low": 1.0}, r"grpo\.clip_low: must be in \[0, 1\), got 1\.0"),
        ({"clip_high": -0.1}, r"grpo\.clip_high"),
        ({"dual_clip": 1.0}, r"grpo\.dual_clip: must be > 1 or null"),
        ({"kl_coef": -1.0}, r"grpo\.kl_coef"),
        ({"kl_clamp": 0.0}, r"grpo\.kl_clamp"),
        ({"entropy_coef": -0.1}, r"grpo\.entropy_coef"),
        ({"max_response_length_tokens": 0}, r"grpo\.max_response_length_tokens"),
        ({"advantage_eps": -1e-3}, r"grpo\.advantage_eps"),
    ],
)
def test_bad_values_name_their_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOLossConfig(**overrides)


def test_section_name_is_configurable_for_the_lead():
    config = GRPOLossConfig()
    config.clip_low = -0.5
    with pytest.raises(ValueError, match=r"^rl\.loss\.clip_low"):
        config.validate(section="rl.loss")


def test_registry_rejects_duplicates_and_unhashable_names():
    registry = Registry("thing")
    registry.register("a")(len)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(len)
    with pytest.raises(ValueError, match=r"unknown thing \['a'\]; valid names: 'a'"):
        registry.get(["a"])


def test_every_problem_is_reported_at_once():
    config = GRPOLossConfig()
    config.clip_low, config.kl_coef, config.kl_estimator = 2.0, -1.0, "k9"
    found = config.problems()
    assert [p.split(":")[0] for p in found] == ["grpo.kl_estimator", "grpo.clip_low", "grpo.kl_coef"]
