"""Difficulty-aware advantage weighting (registered by name): pure tensor functions, ``[n] -> [n]``.

``"grpo_lead"``: GRPO-LEAD (Zhang & Zuo 2025, arXiv:2504.09696, §3.3 "difficulty-aware advantage reweighting").
With ``rho`` a problem's pass rate (the fraction of its group that was correct, or a running estimate from
:class:`~betterai_megatron.rewards.difficulty.PassRateTracker`), the logistic weight

    w(rho) = A + (B - A) / (1 + exp(k * (rho - rho0)))

is large for hard problems (low ``rho``) and small for easy ones. Positive advantages (a correct answer) are
scaled by ``w(rho)``, so solving a hard problem counts more; non-positive ones by ``w(1 - rho)``, so failing an
easy problem is penalised more. Defaults are the authors' released values: ``A = 0.4``, ``B = 1.5``,
``rho0 = 0.75``, ``k = 10``.

``"none"``: advantages unchanged.

:func:`group_pass_rates` gives each sample its group's pass rate (``reward >= success_threshold`` counts as
correct), the input GRPO-LEAD uses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from betterai_megatron.rewards.registry import Registry

AdvantageWeighting = Callable[..., torch.Tensor]
ADVANTAGE_WEIGHTINGS: Registry[AdvantageWeighting] = Registry("advantage weighting")


def group_pass_rates(rewards: torch.Tensor, group_index: torch.Tensor | Sequence[Hashable], *,
                     success_threshold: float = 1.0) -> torch.Tensor:
    """``[n]`` rewards + group labels -> ``[n]``: the fraction of each sample's group with reward >= threshold."""
    from betterai_megatron.rl.advantages import group_inverse_index

    inverse, num_groups = group_inverse_index(group_index, rewards.numel())
    correct = (rewards >= success_threshold).to(torch.float64)
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, correct)
    sizes = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(correct))
    return (sums / sizes)[inverse].to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def logistic_difficulty_weight(pass_rate: torch.Tensor, *, min_weight: float = 0.4, max_weight: float = 1.5,
                               midpoint: float = 0.75, steepness: float = 10.0) -> torch.Tensor:
    """GRPO-LEAD's ``w(rho) = A + (B - A) / (1 + exp(k (rho - rho0)))``, elementwise."""
    return min_weight + (max_weight - min_weight) * torch.sigmoid(-steepness * (pass_rate - midpoint))


@ADVANTAGE_WEIGHTINGS.register("grpo_lead")
def grpo_lead_weighting(advantages: torch.Tensor, pass_rates: torch.Tensor, *, min_weight: float = 0.4,
                        max_weight: float = 1.5, midpoint: float = 0.75, steepness: float = 10.0) -> torch.Tensor:
    """``[n]`` advantages, ``[n]`` pass rates in [0, 1] -> ``[n]`` reweighted advantages."""
    if advantages.shape != pass_rates.shape:
        raise ValueError(f"advantages {list(advantages.shape)} and pass_rates {list(pass_rates.shape)} differ")
    rho = pass_rates.to(advantages.dtype)
    params = {"min_weight": min_weight, "max_weight": max_weight, "midpoint": midpoint, "steepness": steepness}
    weights = torch.where(advantages > 0, logistic_difficulty_weight(rho, **params),
                          logistic_difficulty_weight(1.0 - rho, **params))
    return advantages * weights


@ADVANTAGE_WEIGHTINGS.register("none")
def no_weighting(advantages: torch.Tensor, pass_rates: torch.Tensor, **_: float) -> torch.Tensor:
    return advantages
