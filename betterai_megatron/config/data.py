"""Data section (``data.*``): defined beside the datasets that read it (:mod:`betterai_megatron.data.
pretrain_datasets`, with ``data.sft`` and ``data.preference`` beside their datasets); re-exported here so the
config tree is assembled in one place."""

from betterai_megatron.data.pretrain_datasets import DataConfig, check_data_config

__all__ = ["DataConfig", "check_data_config"]
