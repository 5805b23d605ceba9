"""Configuration: a tree of dataclasses loaded from strict YAML with dotted overrides (see :mod:`.root`)."""

from betterai_megatron.config.loader import ConfigError, dump_yaml, to_dict
from betterai_megatron.config.root import Config, load_config, validate_layout

__all__ = ["Config", "ConfigError", "dump_yaml", "load_config", "to_dict", "validate_layout"]
