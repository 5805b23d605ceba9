"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens, registered by name.

Tokens are sampled from the policy ``pi_theta``; with ``log_r = log pi_ref(x) - log pi_theta(x)`` the estimators
of J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html) are

``"k1"``  ``-log_r``                unbiased, high variance, can be negative;
``"k2"``  ``log_r ** 2 / 2``        biased (low bias when the policies are close), always >= 0;
``"k3"``  ``exp(log_r) - 1 - log_r``  unbiased and always >= 0 (GRPO, DeepSeekMath eq. 4; verl's "low_var_kl").

All map ``log_probs [n, T]`` and ``ref_log_probs [n, T]`` to a per-token penalty ``[n, T]``; reduce it with the
same aggregation as the policy loss (:func:`betterai_megatron.rl.policy_loss.aggregate_loss`).

What the *gradient* of each estimator optimizes, when it is used as a loss term on on-policy samples (the samples
are not differentiated): ``E[grad k1] = E_p[grad log p] = 0`` (k1 carries no KL gradient at all);
``E[grad k2] = E_p[(log p - log q) grad log p] = grad KL(p || q)`` (the reverse KL, what the estimators estimate);
``E[grad k3] = E_p[(1 - q/p) grad log p] = grad KL(q || p)`` (the *forward* KL). GRPO uses k3 in the loss; k2 is the
choice whose gradient matches the reverse KL. We report this rather than pick for the user.

Numerics: ``log_r`` is clamped to ``[-20, 20]`` before ``exp`` in k3 (as verl does), so one token whose
probabilities differ by more than e^20 cannot make the loss inf. ``clamp`` optionally clips the estimate itself to
``[-clamp, clamp]``; clipped tokens get zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from betterai_megatron.rl.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

_MAX_ABS_LOG_RATIO = 20.0


@KL_ESTIMATORS.register("k1")
def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[n, T]``: ``log pi - log pi_ref``."""
    return log_probs - ref_log_probs


@KL_ESTIMATORS.register("k2")
def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[n, T]``: ``(log pi - log pi_ref) ** 2 / 2``."""
    return 0.5 * (log_probs - ref_log_probs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``[n, T]``: ``pi_ref / pi - 1 - log(pi_ref / pi)``."""
    log_ratio = (ref_log_probs - log_probs).clamp(-_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    return torch.exp(log_ratio) - 1.0 - log_ratio


def kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, *, estimator: str = "k3", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        log_probs: ``[n, T]`` log pi_theta of the sampled tokens (differentiable).
        ref_log_probs: ``[n, T]`` log pi_ref of the same tokens (no gradient needed).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        clamp: if given (> 0), the estimate is clipped to ``[-clamp, clamp]``.
    Returns:
        ``[n, T]`` float32 (or float64) penalty; padding positions are not masked here.
    """
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {list(log_probs.shape)} and ref_log_probs {list(ref_log_probs.shape)} differ in shape"
        )
    function = KL_ESTIMATORS.get(estimator)
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    kl = function(log_probs.to(dtype), ref_log_probs.to(dtype))
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        kl = kl.clamp(-clamp, clamp)
    return kl
