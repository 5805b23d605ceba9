"""Group filters (registered by name): which groups of rollouts are worth a gradient step. ``[n] -> [n]`` bool.

``"dapo"``: DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2). A group whose samples all got the
same reward -- all correct or all wrong -- has zero advantage for every sample under GRPO-style normalisation, so it
contributes no gradient but still dilutes the batch. DAPO keeps only groups with ``0 < #correct < G`` and
samples more prompts until the batch is full (the refill is the trainer's loop; this is the predicate). For
non-binary rewards the same rule reads "rewards not all equal": a group is kept when
``max(reward) - min(reward) > tolerance``.

``"none"``: keep everything.

Returns a per-sample mask (every sample of a group shares its group's decision), matching the flat
``rewards [n]`` + ``group_index [n]`` layout of :mod:`betterai_megatron.rl.advantages`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from betterai_megatron.rewards.registry import Registry

GroupFilter = Callable[..., torch.Tensor]
GROUP_FILTERS: Registry[GroupFilter] = Registry("group filter")


@GROUP_FILTERS.register("dapo")
def dapo_group_filter(rewards: torch.Tensor, group_index: torch.Tensor | Sequence[Hashable], *,
                      tolerance: float = 1e-6) -> torch.Tensor:
    """``[n]`` rewards + group labels -> ``[n]`` bool: True for samples of groups whose rewards differ."""
    from betterai_megatron.rl.advantages import group_inverse_index

    inverse, num_groups = group_inverse_index(group_index, rewards.numel())
    values = rewards.to(torch.float64)
    high = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, values, "amax")
    low = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, values, "amin")
    return ((high - low) > tolerance)[inverse]


@GROUP_FILTERS.register("none")
def keep_all_groups(rewards: torch.Tensor, group_index: torch.Tensor | Sequence[Hashable], **_: float) -> torch.Tensor:
    return torch.ones(rewards.numel(), dtype=torch.bool)
