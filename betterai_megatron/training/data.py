"""Training/validation datasets for the pretraining stage (megatron-core's GPT datasets)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from betterai_megatron.config import Config


@dataclass
class _MockTokenizer:
    """What MockGPTDataset needs of a tokenizer: the vocabulary size and the end-of-document id."""

    vocab_size: int

    @property
    def eod(self) -> int:
        return self.vocab_size - 1

    @property
    def pad(self) -> int:
        return self.vocab_size - 1

    @property
    def unique_identifiers(self) -> dict:  # megatron-core hashes this into the dataset cache key
        return {"class": "MockTokenizer", "vocab_size": self.vocab_size}


def build_datasets(config: Config, *, train_samples: int, valid_samples: int):
    """(train, valid) datasets; ``valid`` may be None."""
    t = config.train
    if not config.data.mock:
        from betterai_megatron.data.pretrain_datasets import build_pretrain_datasets
        from betterai_megatron.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        train, valid, _ = build_pretrain_datasets(
            data_config=config.data, tokenizer=tokenizer, seq_length=t.seq_length, seed=t.seed,
            train_samples=train_samples, valid_samples=valid_samples, test_samples=0,
        )
        return train, valid
    dataset_config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=t.seq_length,
        blend=None,
        split="98,1,1",
        tokenizer=_MockTokenizer(config.model.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [train_samples, max(valid_samples, 1), 1], lambda: True, dataset_config
    ).build()
    return train, valid
