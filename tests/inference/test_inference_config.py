"""The ``generation`` config section: typed loading through the project's strict loader, and value checks."""

from __future__ import annotations

import pytest

from betterai_megatron.config.loader import ConfigError, from_dict
from betterai_megatron.inference.config import GenerationConfig, SamplingParams


def test_loads_nested_section_from_plain_data():
    config = from_dict(GenerationConfig, {"max_batch_size": 4, "sampling": {"temperature": 0, "stop_strings": ["\ndef "]}},
                       prefix="generation")
    assert config.max_batch_size == 4
    assert config.sampling.greedy and config.sampling.stop_strings == ["\ndef "]


def test_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match="generation.sampling.top_p"):
        from_dict(GenerationConfig, {"sampling": {"topp": 0.9}}, prefix="generation")


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "generation.sampling.temperature"),
    ("top_p", 0.0, "generation.sampling.top_p"),
    ("top_p", 1.5, "generation.sampling.top_p"),
    ("top_k", -1, "generation.sampling.top_k"),
    ("max_new_tokens", 0, "generation.sampling.max_new_tokens"),
    ("stop_strings", [""], r"generation.sampling.stop_strings\[0\]"),
])
def test_bad_sampling_values_name_the_key(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_bad_batch_size_names_the_key():
    with pytest.raises(ValueError, match="generation.max_batch_size"):
        GenerationConfig(max_batch_size=0)
