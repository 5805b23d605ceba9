"""Training/validation datasets for the pretraining stage (megatron-core's GPT datasets)."""

from __future__ import annotations

from dataclasses import dataclass

from betterai_megatron.config import Config, ConfigError


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
    """(train, valid) megatron-core GPT datasets for this run; ``valid`` is None without validation."""
    from betterai_megatron.data.pretrain_datasets import build_pretrain_datasets

    t = config.train
    if config.data.mock:
        tokenizer = _MockTokenizer(config.model.vocab_size)
    else:
        from betterai_megatron.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}, {config.data.tokenizer_model})")
    train, valid, _ = build_pretrain_datasets(
        data_config=config.data, tokenizer=tokenizer, seq_length=t.seq_length, seed=t.seed,
        train_samples=train_samples, valid_samples=max(valid_samples, 1), test_samples=0,
    )
    return train, (valid if valid_samples else None)
