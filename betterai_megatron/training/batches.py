"""Which samples each rank reads, and how they become megatron-core micro-batches.

The global batch of optimiser step ``s`` is samples ``[consumed, consumed + global_batch_size)`` of the training
dataset; micro-batch ``m`` of data-parallel rank ``r`` takes ``micro_batch_size`` consecutive samples starting at
``consumed + (m * dp + r) * micro_batch_size`` — Megatron-LM's ``MegatronPretrainingSampler`` order. So every
layout sees the same global batch, grouped into the same micro-batches, and ``consumed`` (saved in checkpoints)
is the whole data position. Every rank of a tp/pp/cp group reads the same samples from the (deterministic)
dataset rather than receiving a broadcast; context-parallel ranks then keep their own sequence chunks.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def micro_batch_sample_indices(
    *, consumed_samples: int, micro_batch_index: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> range:
    start = consumed_samples + (micro_batch_index * dp_size + dp_rank) * micro_batch_size
    return range(start, start + micro_batch_size)


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack dataset samples into ``[b, s]`` tensors (tokens/labels/position_ids int64, loss_mask float)."""
    batch = {}
    for key in _KEYS:
        values = np.stack([np.asarray(sample[key]) for sample in samples])
        batch[key] = torch.from_numpy(values)
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    for sample_key in ("attention_mask",):
        if sample_key in samples[0] and samples[0][sample_key] is not None:
            batch[sample_key] = torch.stack([torch.as_tensor(s[sample_key]) for s in samples])
    return batch


def micro_batches(
    dataset,
    *,
    consumed_samples: int,
    num_micro_batches: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    cp_rank: int = 0,
    cp_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one global batch for this rank, as megatron-core schedules consume them."""
    for m in range(num_micro_batches):
        indices = micro_batch_sample_indices(consumed_samples=consumed_samples, micro_batch_index=m,
                                             micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        batch = collate([dataset[i % len(dataset)] for i in indices])
        if cp_size > 1:
            from betterai_megatron.parallel.context_parallel import slice_batch_for_cp_rank

            batch = slice_batch_for_cp_rank(batch, cp_rank=cp_rank, cp_size=cp_size)
        yield batch
