"""Outcome advantages for group-sampled rollouts (GRPO family): pure tensor functions registered by name.

Every prompt is sampled ``samples_per_prompt`` times; the samples of one prompt form a *group*, and a sample's
advantage is its scalar outcome reward measured against the other samples of its group. Estimators
(:data:`ADVANTAGE_ESTIMATORS`, all map rewards ``[n]`` + group index ``[n]`` to sequence advantages ``[n]``):

``"grpo"``     GRPO, Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300) §4.1.2:
               ``A_i = (r_i - mean_g) / (std_g + eps)``. ``std_g`` is the *unbiased* (Bessel-corrected, ``n_g - 1``)
               standard deviation, as in verl and TRL (the paper does not say which).
``"dr_grpo"``  Dr. GRPO, Liu et al. 2025 ("Understanding R1-Zero-Like Training", arXiv:2503.20783):
               ``A_i = r_i - mean_g`` -- no division by the group std, which over-weights groups that are almost all
               right or all wrong. Its second fix, no division by the response length, is the loss aggregation
               ``"seq-mean-token-sum-norm"`` in :mod:`betterai_megatron.rl.policy_loss`; use the two together.
``"rloo"``     REINFORCE leave-one-out, Ahmadian et al. 2024 (arXiv:2402.14740):
               ``A_i = r_i - mean_{j != i} r_j = n_g / (n_g - 1) * (r_i - mean_g)``.

A group of one sample has no baseline to compare with, and a group whose rewards are all equal has nothing to
learn from: every estimator gives both advantage exactly 0 (verl instead uses mean 0 / std 1 for a group of one,
i.e. the raw reward, which silently mixes two scales in one batch).

:func:`compute_outcome_advantages` resolves the estimator by name and broadcasts the per-sequence advantage over the
response tokens: ``[n] -> [n, T]`` times the response mask (0 on padding). Hand-written: these are a few lines of
tensor algebra whose exact conventions (std flavour, singleton groups) we want to own and test.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from betterai_megatron.rl.registry import Registry

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def group_inverse_index(group_index: torch.Tensor | Sequence[Hashable], num_samples: int) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels to dense ids ``0..G-1``.

    Args:
        group_index: ``[n]`` integer tensor, or a sequence of ``n`` hashable labels (e.g. prompt uids).
        num_samples: ``n``, the number of rewards, checked against the labels.
    Returns:
        ``(inverse [n] int64, G)``: ``inverse[i]`` is the dense id of sample ``i``'s group.
    """
    if isinstance(group_index, torch.Tensor):
        if group_index.dim() != 1 or group_index.numel() != num_samples:
            raise ValueError(f"group_index must have shape [{num_samples}], got {list(group_index.shape)}")
        _, inverse = torch.unique(group_index, return_inverse=True)
        return inverse.long(), int(inverse.max().item()) + 1 if num_samples else 0
    labels = list(group_index)
    if len(labels) != num_samples:
        raise ValueError(f"group_index has {len(labels)} labels for {num_samples} rewards")
    dense: dict[Hashable, int] = {}
    inverse_list = [dense.setdefault(label, len(dense)) for label in labels]
    return torch.tensor(inverse_list, dtype=torch.long), len(dense)


def group_statistics(
    rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group count, mean, unbiased std and "has spread" flag of ``rewards``, gathered back to the samples.

    Args:
        rewards: ``[n]`` float.
        inverse: ``[n]`` dense group ids (see :func:`group_inverse_index`).
    Returns:
        ``(count [n], mean [n], std [n], varies [n] bool)`` of each sample's group; ``std`` is 0 for groups of one.
        ``varies`` is False for groups whose rewards are all equal (this includes groups of one): their
        advantage is exactly 0, whatever the rounding of ``r - mean`` (e.g. mean(0.1, 0.1, 0.1) != 0.1 in floats,
        which with ``eps = 0`` would turn into advantages of about -0.82).
    """
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards)
    )
    total = torch.zeros_like(count).index_add_(0, inverse, rewards)
    mean = total / count
    centred = rewards - mean[inverse]
    square_sum = torch.zeros_like(count).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(square_sum / (count - 1).clamp(min=1))
    group_max = torch.full_like(count, -torch.inf).scatter_reduce_(0, inverse, rewards, reduce="amax")
    group_min = torch.full_like(count, torch.inf).scatter_reduce_(0, inverse, rewards, reduce="amin")
    varies = group_max > group_min
    return count[inverse], mean[inverse], std[inverse], varies[inverse]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int, *, eps: float) -> torch.Tensor:
    """``[n] -> [n]``: ``(r - mean_g) / (std_g + eps)``; 0 for groups of one or of equal rewards."""
    _, mean, std, varies = group_statistics(rewards, inverse, num_groups)
    return torch.where(varies, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int, *, eps: float) -> torch.Tensor:
    """``[n] -> [n]``: ``r - mean_g`` (``eps`` unused); 0 for groups of one or of equal rewards."""
    del eps
    _, mean, _, varies = group_statistics(rewards, inverse, num_groups)
    return torch.where(varies, rewards - mean, torch.zeros_like(rewards))


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int, *, eps: float) -> torch.Tensor:
    """``[n] -> [n]``: ``r_i - mean of the other samples of the group``; 0 for groups of one or of equal rewards."""
    del eps
    count, mean, _, varies = group_statistics(rewards, inverse, num_groups)
    scale = count / (count - 1).clamp(min=1)
    return torch.where(varies, scale * (rewards - mean), torch.zeros_like(rewards))


def broadcast_to_tokens(sequence_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` sequence advantages -> ``[n, T]`` token advantages, zero where ``response_mask`` is 0."""
    if response_mask.dim() != 2 or response_mask.shape[0] != sequence_advantages.shape[0]:
        raise ValueError(
            f"response_mask must have shape [{sequence_advantages.shape[0]}, T], got {list(response_mask.shape)}"
        )
    return sequence_advantages[:, None] * (response_mask != 0).to(sequence_advantages.dtype)


def compute_outcome_advantages(
    rewards: torch.Tensor,
    *,
    estimator: str,
    response_mask: torch.Tensor | None = None,
    group_index: torch.Tensor | Sequence[Hashable] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages from scalar outcome rewards.

    Args:
        rewards: either ``[n]`` with ``group_index`` ``[n]`` (samples of a group need not be contiguous), or
            ``[num_groups, samples_per_prompt]`` with ``group_index=None`` (row ``g`` is group ``g``; the output
            is flattened row-major to ``n = num_groups * samples_per_prompt``).
        estimator: a name in :data:`ADVANTAGE_ESTIMATORS` (``"grpo"``, ``"dr_grpo"``, ``"rloo"``).
        response_mask: ``[n, T]`` 1 on response tokens, 0 on padding; ``None`` returns sequence advantages.
        group_index: ``[n]`` group labels (int tensor or hashable labels) when ``rewards`` is 1-D.
        eps: added to the group std by ``"grpo"``.
    Returns:
        ``[n, T]`` token advantages (float32, or float64 for float64 rewards), or ``[n]`` without a mask.
    """
    function = ADVANTAGE_ESTIMATORS.get(estimator)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.to(dtype)
    if rewards.dim() == 2:
        if group_index is not None:
            raise ValueError("rewards of shape [num_groups, samples_per_prompt] take no group_index")
        num_groups, samples_per_prompt = rewards.shape
        group_index = torch.arange(num_groups, device=rewards.device).repeat_interleave(samples_per_prompt)
        rewards = rewards.reshape(-1)
    elif rewards.dim() != 1 or group_index is None:
        raise ValueError(
            "rewards must be [n] with group_index [n], or [num_groups, samples_per_prompt]; "
            f"got shape {list(rewards.shape)} with group_index={'None' if group_index is None else 'given'}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(
            f"rewards contain NaN or inf at indices {torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()}"
        )
    inverse, num_groups = group_inverse_index(group_index, rewards.numel())
    sequence_advantages = function(rewards, inverse.to(rewards.device), num_groups, eps=eps)
    if response_mask is None:
        return sequence_advantages
    return broadcast_to_tokens(sequence_advantages, response_mask)
