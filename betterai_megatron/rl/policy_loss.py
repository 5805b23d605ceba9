"""The GRPO policy loss: clipped surrogate, loss aggregation by name, entropy and token log-probs from logits.

Notation: ``n`` sequences (trajectories) in the micro-batch, ``T`` padded response length, ``V`` vocabulary size.
All per-token tensors are ``[n, T]`` and aligned with the response tokens; ``response_mask`` is 1 on tokens to
train and 0 on padding -- it may also hold non-negative *weights* (tree rollouts train shared prefixes with weight
0 or 1/k, see :mod:`betterai_megatron.rl.tree`); every aggregation below treats it as a weight.

Clipped surrogate (PPO, Schulman et al. 2017, arXiv:1707.06347) with the ratio ``r = pi_theta / pi_old``::

    loss_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))

``clip_low != clip_high`` is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476 §3.1, clip_low 0.2 / clip_high
0.28): a larger upper bound lets low-probability tokens with positive advantage grow, against entropy collapse.
Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729) additionally
bounds the loss of negative-advantage tokens whose ratio has exploded: for ``A_t < 0`` the loss is
``min(loss_t, -A_t * dual_clip)`` with ``dual_clip > 1`` (typically 3).

Aggregations (:data:`LOSS_AGGREGATIONS`; ``m`` the mask, ``L`` the per-token loss, ``S`` the non-empty sequences):

``"token-mean"``               ``sum_it m L / sum_it m``                         DAPO §3.3 (token-level loss)
``"seq-mean-token-mean"``      ``1/|S| sum_i (sum_t m L / sum_t m)``             GRPO (DeepSeekMath eq. 3)
``"seq-mean-token-sum"``       ``1/|S| sum_i sum_t m L``
``"seq-mean-token-sum-norm"``  ``1/(|S| * max_response_length_tokens) sum_it m L``  Dr. GRPO (a constant length)

For gradient accumulation and data parallelism, pass the *global* denominators (``global_num_tokens`` =
``sum m`` over the whole mini-batch, ``global_num_sequences`` = ``|S|`` over it): the micro-batch losses then sum to
the mini-batch loss exactly (tested). Without them the denominators are those of the tensors given. megatron-core's
DDP *averages* gradients over data-parallel ranks, so with global denominators across ranks multiply the loss by the
data-parallel size (or divide the denominators by it).

Hand-written: these are short tensor expressions whose conventions (weights, global denominators, metrics) are
part of our contract with the trainer; no maintained library exposes them as pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from betterai_megatron.rl.kl import kl_penalty
from betterai_megatron.rl.registry import Registry

if TYPE_CHECKING:
    from betterai_megatron.rl.algo_config import GRPOLossConfig

LossAggregation = Callable[..., torch.Tensor]
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation mode")

# exp(20) ~ 5e8: a larger log-ratio is a numerical accident, not a policy change worth following (verl clamps too).
_MAX_ABS_LOG_RATIO = 20.0
_TINY = 1e-8


def _sequence_count(mask: torch.Tensor, global_num_sequences: float | None) -> torch.Tensor | float:
    if global_num_sequences is not None:
        return global_num_sequences
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(loss, mask, *, max_response_length_tokens, global_num_tokens, global_num_sequences):
    denominator = mask.sum() if global_num_tokens is None else torch.as_tensor(global_num_tokens, dtype=loss.dtype)
    return (loss * mask).sum() / denominator.to(loss.device).clamp(min=_TINY)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(loss, mask, *, max_response_length_tokens, global_num_tokens, global_num_sequences):
    per_sequence = (loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=_TINY)
    return per_sequence.sum() / _sequence_count(mask, global_num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(loss, mask, *, max_response_length_tokens, global_num_tokens, global_num_sequences):
    return (loss * mask).sum() / _sequence_count(mask, global_num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss, mask, *, max_response_length_tokens, global_num_tokens, global_num_sequences):
    length = loss.shape[-1] if max_response_length_tokens is None else max_response_length_tokens
    return (loss * mask).sum() / (_sequence_count(mask, global_num_sequences) * length)


def aggregate_loss(
    loss_per_token: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str,
    max_response_length_tokens: int | None = None,
    global_num_tokens: float | None = None,
    global_num_sequences: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[n, T]`` to a scalar with the aggregation ``mode`` (see the module docstring).

    ``max_response_length_tokens`` is Dr. GRPO's constant (defaults to ``T``; set it to the generation limit so the
    scale does not depend on the padding of each micro-batch).
    """
    if loss_per_token.shape != response_mask.shape or loss_per_token.dim() != 2:
        raise ValueError(
            f"loss_per_token {list(loss_per_token.shape)} and response_mask {list(response_mask.shape)} "
            "must both be [n, T]"
        )
    function = LOSS_AGGREGATIONS.get(mode)
    return function(
        loss_per_token,
        response_mask.to(loss_per_token.dtype),
        max_response_length_tokens=max_response_length_tokens,
        global_num_tokens=global_num_tokens,
        global_num_sequences=global_num_sequences,
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``values [n, T]`` with weights ``mask [n, T]`` (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=_TINY)


def clipped_policy_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg_mode: str = "token-mean",
    max_response_length_tokens: int | None = None,
    global_num_tokens: float | None = None,
    global_num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate loss with asymmetric clipping and optional dual-clip.

    Args:
        log_probs: ``[n, T]`` log pi_theta of the sampled tokens (differentiable).
        old_log_probs: ``[n, T]`` log pi_old of the same tokens, recomputed by the trainer before the updates.
        advantages: ``[n, T]`` token advantages.
        response_mask: ``[n, T]`` weights, 1 on trained tokens, 0 on padding.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: ``None``, or ``c > 1``: negative-advantage token losses are capped at ``-A * c``.
        loss_agg_mode, max_response_length_tokens, global_num_tokens, global_num_sequences: see
            :func:`aggregate_loss`.
    Returns:
        ``(loss, metrics)``: a scalar loss to minimise, and detached scalar tensors (no host sync): ``clip_fraction``
        (tokens whose gradient the clip zeroes = ``clip_fraction_low + clip_fraction_high``), ``dual_clip_fraction``,
        ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta)), ``ratio_mean``, ``ratio_min``, ``ratio_max``; means
        are weighted by ``response_mask``.
    """
    shape = list(log_probs.shape)
    for name, tensor in (
        ("old_log_probs", old_log_probs),
        ("advantages", advantages),
        ("response_mask", response_mask),
    ):
        if list(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {list(tensor.shape)}, log_probs has {shape}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")

    # Loss math in float32 even when the model runs in bf16: ratios near 1 need the mantissa.
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    log_ratio = (log_probs.to(dtype) - old_log_probs.to(dtype)).clamp(-_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.to(dtype)
    mask = response_mask.to(dtype)

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_per_token = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    dual_active = torch.zeros_like(negative)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = negative & (loss_per_token > cap)
        loss_per_token = torch.where(dual_active, cap, loss_per_token)

    loss = aggregate_loss(
        loss_per_token,
        mask,
        mode=loss_agg_mode,
        max_response_length_tokens=max_response_length_tokens,
        global_num_tokens=global_num_tokens,
        global_num_sequences=global_num_sequences,
    )
    with torch.no_grad():
        ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
        clipped_low = negative & (ratio_d < 1.0 - clip_low)
        clipped_high = (advantages > 0) & (ratio_d > 1.0 + clip_high)
        valid = mask > 0
        has_valid = valid.any()
        one = torch.ones((), dtype=dtype, device=ratio_d.device)
        metrics = {
            "clip_fraction_low": masked_mean(clipped_low.to(dtype), mask),
            "clip_fraction_high": masked_mean(clipped_high.to(dtype), mask),
            "dual_clip_fraction": masked_mean(dual_active.to(dtype), mask),
            # k3 with samples from pi_old: E_old[(r - 1) - log r] = KL(pi_old || pi_theta), unbiased and >= 0.
            "approx_kl": masked_mean(ratio_d - 1.0 - log_ratio_d, mask),
            "ratio_mean": masked_mean(ratio_d, mask),
            "ratio_min": torch.where(has_valid, torch.where(valid, ratio_d, torch.inf).min(), one),
            "ratio_max": torch.where(has_valid, torch.where(valid, ratio_d, -torch.inf).max(), one),
        }
        metrics["clip_fraction"] = metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
    return loss, metrics


def token_log_probs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]``: ``logits [n, T, V]``, ``token_ids [n, T]`` -> ``[n, T]`` (float32).

    ``logits[:, t]`` must already be the prediction *for* ``token_ids[:, t]`` (shift before calling).
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)``: ``[..., V] -> [...]`` (float32), ``H = logsumexp(z) - sum softmax(z) z``."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy of ``[N, V]`` logits chunk by chunk, with the analytic gradient ``dH/dz = p * (E_p[z] - z)``.

    Saves only ``logsumexp`` and ``H`` (``[N]`` each) besides the logits themselves, and recomputes each chunk's
    softmax in backward, so no ``[N, V]`` float32 temporary is ever alive (activation checkpointing would do the
    same but pulls in torch._dynamo, a 10+ s first import on a small CPU box).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_size_tokens: int) -> torch.Tensor:
        log_normalisers, entropies = [], []
        for chunk in logits.split(chunk_size_tokens):
            chunk = chunk.float()
            log_normaliser = torch.logsumexp(chunk, dim=-1)
            probs = torch.exp(chunk - log_normaliser[:, None])
            log_normalisers.append(log_normaliser)
            entropies.append(log_normaliser - (probs * chunk).sum(dim=-1))
        log_normaliser, entropy = torch.cat(log_normalisers), torch.cat(entropies)
        ctx.save_for_backward(logits, log_normaliser, entropy)
        ctx.chunk_size_tokens = chunk_size_tokens
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, log_normaliser, entropy = ctx.saved_tensors
        size = ctx.chunk_size_tokens
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], size):
            rows = slice(start, start + size)
            chunk = logits[rows].float()
            probs = torch.exp(chunk - log_normaliser[rows, None])
            expected_logit = (log_normaliser[rows] - entropy[rows])[:, None]  # E_p[z] = logsumexp(z) - H
            grad[rows] = (grad_entropy[rows, None] * probs * (expected_logit - chunk)).to(logits.dtype)
        return grad, None


def entropy_from_logits_chunked(logits: torch.Tensor, *, chunk_size_tokens: int = 1024) -> torch.Tensor:
    """:func:`entropy_from_logits` over ``chunk_size_tokens`` rows at a time: ``[n, T, V] -> [n, T]`` float32.

    The float32 softmax of a whole ``[n, T, V]`` batch (e.g. 8 x 4096 x 150k) is ~20 GB; chunking bounds the
    temporaries to ``chunk_size_tokens x V`` in forward *and* backward (a custom autograd function recomputes each
    chunk's softmax in backward instead of saving it).
    """
    if chunk_size_tokens <= 0:
        raise ValueError(f"chunk_size_tokens must be positive, got {chunk_size_tokens}")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return _ChunkedEntropy.apply(flat, chunk_size_tokens).reshape(logits.shape[:-1])


def apply_overlong_filter(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering (§3.4): drop truncated responses from the loss.

    ``response_mask [n, T]``, ``truncated [n]`` bool (hit the generation limit) -> ``[n, T]`` mask with the
    truncated rows zeroed. Their reward reflects the cut, not the reasoning, so they are noise for the update.
    """
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must have shape [{response_mask.shape[0]}], got {list(truncated.shape)}")
    return response_mask * (~truncated.bool()).to(response_mask.dtype)[:, None]


def compute_grpo_loss(
    *,
    config: GRPOLossConfig,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    global_num_tokens: float | None = None,
    global_num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full GRPO objective: ``pg_loss + kl_coef * agg(KL) - entropy_coef * agg(entropy)``.

    Args:
        config: the ``grpo`` config section (clip, aggregation, KL and entropy settings).
        log_probs, old_log_probs, advantages, response_mask: ``[n, T]``, see :func:`clipped_policy_loss`.
        ref_log_probs: ``[n, T]`` reference-policy log-probs; required when ``config.kl_coef > 0``.
        entropy: ``[n, T]`` per-token policy entropy (differentiable); required when ``config.entropy_coef > 0``.
        global_num_tokens, global_num_sequences: global denominators (see :func:`aggregate_loss`).
    Returns:
        ``(loss, metrics)``; metrics adds ``pg_loss``, ``kl`` and ``entropy`` (when given) and ``loss``.
    """
    aggregation = {
        "mode": config.loss_agg_mode,
        "max_response_length_tokens": config.max_response_length_tokens,
        "global_num_tokens": global_num_tokens,
        "global_num_sequences": global_num_sequences,
    }
    pg_loss, metrics = clipped_policy_loss(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        response_mask=response_mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        dual_clip=config.dual_clip,
        loss_agg_mode=config.loss_agg_mode,
        max_response_length_tokens=config.max_response_length_tokens,
        global_num_tokens=global_num_tokens,
        global_num_sequences=global_num_sequences,
    )
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    if config.kl_coef > 0 and ref_log_probs is None:
        raise ValueError("grpo.kl_coef > 0 needs ref_log_probs (the frozen reference policy's log-probs)")
    if ref_log_probs is not None:
        kl = kl_penalty(log_probs, ref_log_probs, estimator=config.kl_estimator, clamp=config.kl_clamp)
        kl_loss = aggregate_loss(kl, response_mask, **aggregation)
        metrics["kl"] = kl_loss.detach()
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * kl_loss
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("grpo.entropy_coef > 0 needs the per-token entropy (entropy_from_logits)")
    if entropy is not None:
        entropy_mean = aggregate_loss(entropy.float(), response_mask, **aggregation)
        metrics["entropy"] = entropy_mean.detach()
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * entropy_mean
    metrics["loss"] = loss.detach()
    return loss, metrics
