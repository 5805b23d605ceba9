"""The frozen reference policy of the KL term: built only when ``grpo.kl_coef > 0``.

The reference is the policy GRPO *started* from: the same architecture and layout as the trainer's model, with the
weights of ``checkpoint.load_dir`` (the previous stage, loaded weights-only through megatron-core
``dist_checkpointing``, which reshards across tp/dp layouts), or -- without a ``load_dir`` -- the seed-determined
initialisation the policy itself started from (``model.init=layout_invariant`` gives the same weights for the same
``train.seed`` at any layout). It is loaded from there rather than copied from the policy, so a GRPO run that
resumes from its own checkpoint still measures KL to the original starting point.

It has no DDP wrapper, no optimiser and no gradients (``requires_grad_(False)``, ``eval()``); its log-probs go into
the micro-batches as ``ref_log_probs`` (:func:`~betterai_megatron.rl.policy_update.compute_log_probs`). Memory: one
more copy of the weights per rank (no optimiser state).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_model_weights(chunks: list, load_dir: str | Path, *, checkpoint) -> Path:
    """Load the model weights of the newest checkpoint in ``load_dir`` into ``chunks`` (no optimiser, no RNG).

    The :class:`~betterai_megatron.training.checkpointing.Checkpointer` loads a model only together with an
    optimiser; this is its model-only half, built from the same pieces (``build_sharded_state_dict`` with the
    checkpoint's own sharding metadata).
    """
    from megatron.core import dist_checkpointing

    from betterai_megatron.training import checkpoint_files as files
    from betterai_megatron.training.checkpointing import (
        build_sharded_state_dict,
        model_keys,
        sharded_state_metadata,
    )

    tracked = files.read_tracker(load_dir)
    if tracked is None:
        raise files.CheckpointError(f"checkpoint.load_dir={load_dir}: no {files.TRACKER_FILENAME} there "
                                    "(not a checkpoint directory, or no save completed)")
    path = files.checkpoint_path(load_dir, tracked)
    common = dist_checkpointing.load_common_state_dict(str(path))
    metadata = {**sharded_state_metadata(checkpoint, distributed_optimizer=False),
                **(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {})}
    state_dict = build_sharded_state_dict(chunks=chunks, is_loading=True, metadata=metadata)
    loaded = dist_checkpointing.load(state_dict, str(path))
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded[key], strict=True)
    return path


def build_reference_policy(*, config, seq_length: int) -> list:
    """The frozen reference model chunk(s) for ``config`` (see the module docstring)."""
    from betterai_megatron.model.builder import build_model_chunks

    chunks, _ = build_model_chunks(model=config.model, parallel=config.parallel, seq_length=seq_length,
                                   seed=config.train.seed)
    if config.checkpoint.load_dir:
        path = load_model_weights(chunks, config.checkpoint.load_dir, checkpoint=config.checkpoint)
        logger.info("reference policy: weights of %s", path)
    else:
        logger.info("reference policy: the initialisation of train.seed=%d (no checkpoint.load_dir)",
                    config.train.seed)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks
