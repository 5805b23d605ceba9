"""Load a trained model for generation or evaluation: layout set-up, model build, weights from a checkpoint.

The checkpoint is any ``checkpoint.dir`` of a training stage (``latest_checkpointed_iteration.txt`` +
``iter_N/``); dist_checkpointing reshards it to the layout in ``config.parallel`` (which may differ from the one
it was saved with). Only model weights are read: no optimiser, scheduler or RNG state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from betterai_megatron.config import Config, ConfigError, validate_layout
from betterai_megatron.model.builder import build_model_chunks
from betterai_megatron.parallel.layout import initialize_parallel
from betterai_megatron.platform.distributed import init_distributed

logger = logging.getLogger(__name__)


def load_weights(chunks: list, checkpoint_dir: str | Path) -> Path:
    """Load model weights (only) from the newest complete checkpoint in ``checkpoint_dir`` into ``chunks``."""
    from betterai_megatron.config.train import CheckpointConfig
    from betterai_megatron.training import checkpoint_files as files
    from betterai_megatron.training.checkpointing import (
        build_sharded_state_dict,
        model_keys,
        sharded_state_metadata,
    )

    root = Path(checkpoint_dir)
    tracked = files.read_tracker(root)
    if tracked is None:
        raise ConfigError(f"{root}: no {files.TRACKER_FILENAME} (not a checkpoint directory, or no save completed)")
    path = files.checkpoint_path(root, tracked)
    common = dist_checkpointing.load_common_state_dict(str(path))
    # the model's sharded keys do not depend on the optimizer part of the metadata; the saved metadata wins
    metadata = {**sharded_state_metadata(CheckpointConfig(), distributed_optimizer=False),
                **(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {})}
    state_dict = build_sharded_state_dict(chunks=chunks, is_loading=True, metadata=metadata)
    loaded = dist_checkpointing.load(state_dict, str(path))
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded[key], strict=True)
    return path


def load_model_for_inference(config: Config, checkpoint_dir: str | Path | None):
    """Initialise distributed + the layout, build the model (pp must be 1) and load its weights.

    Returns the GPTModel in eval mode. With ``checkpoint_dir=None`` the freshly initialised model is returned
    (useful for smoke tests of a config).
    """
    if config.parallel.pp > 1:
        raise ConfigError(f"parallel.pp={config.parallel.pp}: generation runs with parallel.pp=1 "
                          "(a pipeline-parallel checkpoint loads into pp=1 through resharding)")
    info = init_distributed(backend=config.parallel.backend)
    validate_layout(config, info.world_size)
    initialize_parallel(config.parallel, seed=config.train.seed)
    chunks, _ = build_model_chunks(model=config.model, parallel=config.parallel, seq_length=config.train.seq_length,
                                   seed=config.train.seed)
    if checkpoint_dir is not None:
        path = load_weights(chunks, checkpoint_dir)
        if info.rank == 0:
            logger.info("loaded model weights from %s", path)
    model = chunks[0]
    model.eval()
    torch.set_grad_enabled(False)
    return model
