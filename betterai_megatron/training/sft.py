"""The SFT stage: the pretraining engine (layouts, checkpoints, resume, signals, logging) on chat data.

What differs from pretraining is only where samples come from — packed conversations rendered with the chat
template, loss on assistant tokens only, no attention across packed conversations
(:mod:`betterai_megatron.data.sft_dataset`) — and where the weights start: the previous stage's checkpoint,
weights only (``checkpoint.load_dir`` + ``checkpoint.load_weights_only``), with a fresh optimiser and step 0.
Checkpoints go to the stage's own ``checkpoint.dir`` (default ``<run.dir>/checkpoints``); the source checkpoint
is only read. A preempted SFT run resumes from its own checkpoint first.

Missing inputs are reported before any model is built, each naming its key (:func:`check_sft_inputs`). With
``data.sft.builtin_if_missing`` the stage writes the built-in demo inputs itself (:func:`ensure_builtin_sft_data`:
the pipeline's demo conversations and a sentencepiece tokenizer trained on the built-in corpus; no download).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from betterai_megatron.config import Config, ConfigError

logger = logging.getLogger(__name__)

# The demo tokenizer is trained on a few MB of text; larger vocabularies than this do not fit that corpus.
BUILTIN_TOKENIZER_MAX_VOCAB = 2048


def build_sft_training_datasets(config: Config, *, train_samples: int, valid_samples: int):
    """(train, valid) packed SFT datasets for the trainer; ``valid`` is None without validation."""
    from betterai_megatron.data.sft_dataset import build_sft_datasets
    from betterai_megatron.data.tokenizer import build_tokenizer

    if config.data.sft.builtin_if_missing:
        _build_builtin_on_rank0(config)
    check_sft_inputs(config, checkpoint=False)
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, data.tokenizer_model={config.data.tokenizer_model})")
    train, valid = build_sft_datasets(config=config.data.sft, tokenizer=tokenizer, seq_length=config.train.seq_length,
                                      seed=config.train.seed, train_samples=train_samples,
                                      valid_samples=valid_samples or None)
    return train, (valid if valid_samples else None)


def check_sft_inputs(config: Config, *, data: bool = True, checkpoint: bool = True) -> None:
    """Raise one ConfigError listing every missing input (data files, tokenizer, start checkpoint), by key."""
    from betterai_megatron.training import checkpoint_files as files

    sft, problems = config.data.sft, []
    if data:
        problems += _data_problems(config)
    if checkpoint:
        problems += _checkpoint_problems(config, files)
    if problems:
        hint = ("" if sft.builtin_if_missing or not data else
                "\n  (data.sft.builtin_if_missing=true writes the built-in demo conversations and tokenizer there)")
        raise ConfigError("SFT inputs missing:\n  - " + "\n  - ".join(problems) + hint)


def _data_problems(config: Config) -> list[str]:
    sft, problems = config.data.sft, []
    if not sft.paths:
        problems.append("data.sft.paths is empty: give the SFT conversation files")
    problems += [f"data.sft.paths: {path} does not exist" for path in sft.paths if not Path(path).exists()]
    if config.data.tokenizer_model is None:
        problems.append("data.tokenizer_model is not set: SFT renders conversations with the tokenizer")
    elif not Path(config.data.tokenizer_model).exists():
        problems.append(f"data.tokenizer_model={config.data.tokenizer_model} does not exist")
    return problems


def _checkpoint_problems(config: Config, files) -> list[str]:
    c = config.checkpoint
    own = Path(c.dir) if c.dir else Path(config.run.dir) / "checkpoints"
    if not c.load_dir or files.read_tracker(own) is not None:
        return []  # a fresh start, or this stage resumes from its own checkpoint
    if files.read_tracker(c.load_dir) is None:
        return [(f"checkpoint.load_dir={c.load_dir}: no {files.TRACKER_FILENAME} there (no completed checkpoint); "
                 "run the pretraining stage first, or point checkpoint.load_dir at its checkpoint directory")]
    return []


def ensure_builtin_sft_data(config: Config, *, demo=None) -> list[Path]:
    """Write the missing built-in demo inputs; returns the files written (none when all exist).

    ``data.sft.paths`` must be one ``.jsonl`` path: the demo conversations (graded coding tasks answered in the
    ``<think>`` + code format RL prompts with, :mod:`betterai_megatron.pipeline.demo_data`) are written there, with
    that module's other files beside it. ``data.tokenizer_model`` (``*.model``) gets a BPE sentencepiece model
    of ``min(model.vocab_size, 2048)`` pieces with the chat special tokens, trained on the demo pretraining text
    (task solutions and CPython standard-library sources). ``demo`` (a ``DemoDataConfig``) sizes the data;
    default: the pipeline's defaults with ``train.seed``.
    """
    import json

    from betterai_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_tokenizer,
    )
    from betterai_megatron.pipeline.demo_data import DemoDataConfig, write_demo_data

    sft, tokenizer_model = config.data.sft, config.data.tokenizer_model
    if len(sft.paths) != 1 or not str(sft.paths[0]).endswith(".jsonl"):
        raise ConfigError(f"data.sft.builtin_if_missing=true needs data.sft.paths to be one .jsonl file, got "
                          f"{sft.paths}")
    if not tokenizer_model or not str(tokenizer_model).endswith(".model"):
        raise ConfigError(f"data.sft.builtin_if_missing=true needs data.tokenizer_model to be a *.model path, got "
                          f"{tokenizer_model!r}")
    if config.data.tokenizer_type not in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        raise ConfigError(f"data.sft.builtin_if_missing=true trains a sentencepiece tokenizer; data.tokenizer_type="
                          f"{config.data.tokenizer_type} does not read one")
    sft_path, model_path = Path(sft.paths[0]), Path(tokenizer_model)
    if sft_path.exists() and model_path.exists():
        return []
    demo_dir = sft_path.parent / (sft_path.stem + "_builtin")
    demo = write_demo_data(demo_dir, demo or DemoDataConfig(seed=config.train.seed))
    written = []
    if not sft_path.exists():
        sft_path.parent.mkdir(parents=True, exist_ok=True)
        demo["sft"].replace(sft_path)
        written.append(sft_path)
    if not model_path.exists():
        texts = (json.loads(line)["text"] for line in demo["pretrain"].open() if line.strip())
        vocab_size = min(config.model.vocab_size, BUILTIN_TOKENIZER_MAX_VOCAB)
        train_tokenizer(texts, str(model_path.with_suffix("")),
                        config=TokenizerTrainingConfig(vocab_size=vocab_size, seed=config.train.seed))
        written.append(model_path)
    logger.info("wrote the built-in SFT inputs %s (task files beside them in %s)", [str(p) for p in written],
                demo_dir)
    return written


def _build_builtin_on_rank0(config: Config) -> None:
    """Rank 0 writes the built-in inputs while the other ranks wait (they all read them next)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    if rank == 0:
        try:
            ensure_builtin_sft_data(config)
        except ConfigError as exc:
            error = exc
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error


def run_sft(config: Config):
    """Run the SFT stage; the pretraining loop with SFT data."""
    from betterai_megatron.training.pretrain import run_pretraining

    # before torch.distributed and the model, so a wrong path fails in a second (built-in data is written later,
    # on rank 0 only, once the process group exists)
    check_sft_inputs(config, data=not config.data.sft.builtin_if_missing)
    if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
        _warn_about_the_start(config)
    if config.data.sft.create_attention_mask is False and config.parallel.cp == 1:
        # The local attention path needs the block-diagonal mask so packed conversations do not see each other.
        config.data.sft.create_attention_mask = True
    return run_pretraining(config, build_datasets=build_sft_training_datasets)


def _warn_about_the_start(config: Config) -> None:
    c = config.checkpoint
    if c.load_dir is None:
        logger.warning("checkpoint.load_dir is not set: SFT starts from randomly initialised weights")
    elif not c.load_weights_only:
        logger.warning("checkpoint.load_weights_only=false: the full training state of %s (optimizer, schedule, "
                       "step) is resumed; set it to true to start SFT from its weights at step 0", c.load_dir)
