"""The SFT stage: the pretraining engine (layouts, checkpoints, resume, signals, logging) on chat data.

What differs from pretraining is only where samples come from — packed conversations rendered with the chat
template, loss on assistant tokens only, no attention across packed conversations
(:mod:`betterai_megatron.data.sft_dataset`) — and where the weights start: the previous stage's checkpoint,
weights only (``checkpoint.load_dir`` + ``checkpoint.load_weights_only``), with a fresh optimiser and step 0.
"""

from __future__ import annotations

from betterai_megatron.config import Config, ConfigError


def build_sft_training_datasets(config: Config, *, train_samples: int, valid_samples: int):
    """(train, valid) packed SFT datasets for the trainer; ``valid`` is None without validation."""
    from betterai_megatron.data.sft_dataset import build_sft_datasets
    from betterai_megatron.data.tokenizer import build_tokenizer

    if not config.data.sft.paths:
        raise ConfigError("data.sft.paths is empty: give the SFT conversation files")
    if config.data.tokenizer_model is None:
        raise ConfigError("data.tokenizer_model is not set: SFT renders conversations with the tokenizer")
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    train, valid = build_sft_datasets(config=config.data.sft, tokenizer=tokenizer, seq_length=config.train.seq_length,
                                      seed=config.train.seed, train_samples=train_samples,
                                      valid_samples=valid_samples or None)
    return train, (valid if valid_samples else None)


def run_sft(config: Config):
    """Run the SFT stage; the pretraining loop with SFT data."""
    from betterai_megatron.training.pretrain import run_pretraining

    if config.data.sft.create_attention_mask is False and config.parallel.cp == 1:
        # The local attention path needs the block-diagonal mask so packed conversations do not see each other.
        config.data.sft.create_attention_mask = True
    return run_pretraining(config, build_datasets=build_sft_training_datasets)
