"""Clipped surrogate loss, aggregations, entropy and log-probs against hand-computed values and autograd-free maths."""

import math

import pytest
import torch

from betterai_megatron.rl.algo_config import GRPOLossConfig
from betterai_megatron.rl.policy_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    apply_overlong_filter,
    clipped_policy_loss,
    compute_grpo_loss,
    entropy_from_logits,
    entropy_from_logits_chunked,
    token_log_probs_from_logits,
)

# Six tokens in two sequences (seq 0 has 2 tokens + 2 padding, seq 1 has 4), clip_low 0.2, clip_high 0.28:
#   t1  A=+1 r=1.1  -> max(-1.1, -1.1)            = -1.1   (inside the trust region)
#   t2  A=+1 r=1.5  -> max(-1.5, -1.28)           = -1.28  (clipped high)
#   t3  A=-1 r=0.5  -> max( 0.5,  0.8)            =  0.8   (clipped low)
#   t4  A=-2 r=1.5  -> max( 3.0,  2.56)           =  3.0
#   t5  A=-1 r=4.0  -> max( 4.0,  1.28)           =  4.0   (dual-clip c=3 caps it at 3.0)
#   t6  A=+2 r=0.5  -> max(-1.0, -1.6)            = -1.0
# padding tokens carry a huge ratio and advantage that must not leak into anything.
RATIOS = [[1.1, 1.5, 10.0, 10.0], [0.5, 1.5, 4.0, 0.5]]
ADVANTAGES = [[1.0, 1.0, 5.0, 5.0], [-1.0, -2.0, -1.0, 2.0]]
MASK = [[1, 1, 0, 0], [1, 1, 1, 1]]
TOKEN_LOSSES = [-1.1, -1.28, 0.8, 3.0, 4.0, -1.0]


def example(**kwargs):
    ratios = torch.tensor(RATIOS, dtype=torch.float64)
    return clipped_policy_loss(
        log_probs=ratios.log(),
        old_log_probs=torch.zeros(2, 4, dtype=torch.float64),
        advantages=torch.tensor(ADVANTAGES, dtype=torch.float64),
        response_mask=torch.tensor(MASK),
        clip_low=0.2,
        clip_high=0.28,
        **kwargs,
    )


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("token-mean", {}, sum(TOKEN_LOSSES) / 6),  # 4.42 / 6
        ("seq-mean-token-mean", {}, ((-1.1 - 1.28) / 2 + (0.8 + 3.0 + 4.0 - 1.0) / 4) / 2),  # (-1.19 + 1.7) / 2
        ("seq-mean-token-sum", {}, sum(TOKEN_LOSSES) / 2),
        ("seq-mean-token-sum-norm", {}, sum(TOKEN_LOSSES) / (2 * 4)),  # constant = padded T = 4
        ("seq-mean-token-sum-norm", {"max_response_length_tokens": 8}, sum(TOKEN_LOSSES) / (2 * 8)),
    ],
)
def test_clipped_loss_values_per_aggregation(mode, kwargs, expected):
    loss, _ = example(loss_agg_mode=mode, **kwargs)
    assert float(loss) == pytest.approx(expected, abs=1e-9)


def test_dual_clip_caps_negative_advantage_tokens():
    loss, metrics = example(dual_clip=3.0)
    assert float(loss) == pytest.approx((sum(TOKEN_LOSSES) - 4.0 + 3.0) / 6, abs=1e-9)
    assert float(metrics["dual_clip_fraction"]) == pytest.approx(1 / 6)


def test_metrics_by_hand():
    _, m = example()
    assert float(m["clip_fraction_high"]) == pytest.approx(1 / 6)  # t2
    assert float(m["clip_fraction_low"]) == pytest.approx(1 / 6)  # t3
    assert float(m["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(m["dual_clip_fraction"]) == 0.0
    ratios = [1.1, 1.5, 0.5, 1.5, 4.0, 0.5]
    assert float(m["ratio_mean"]) == pytest.approx(sum(ratios) / 6)
    assert float(m["ratio_min"]) == pytest.approx(0.5)
    assert float(m["ratio_max"]) == pytest.approx(4.0)  # not the padding's 10
    assert float(m["approx_kl"]) == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 6)
    assert all(not v.requires_grad for v in m.values())


def test_ratio_is_one_when_old_equals_new():
    # The first update of a step: old log-probs are the current ones. Ratio 1, nothing clipped, KL 0, and the
    # gradient is the plain policy gradient -A * grad log pi / num_tokens.
    generator = torch.Generator().manual_seed(1)
    log_probs = (-torch.rand(3, 5, generator=generator) * 3).requires_grad_()
    advantages = torch.randn(3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    loss, m = clipped_policy_loss(
        log_probs=log_probs, old_log_probs=log_probs.detach().clone(), advantages=advantages, response_mask=mask
    )
    assert float(m["ratio_min"]) == float(m["ratio_max"]) == float(m["ratio_mean"]) == 1.0
    assert float(m["clip_fraction"]) == 0.0 and float(m["approx_kl"]) == 0.0
    assert float(loss.detach()) == pytest.approx(-float((advantages * mask).sum()) / 9, abs=1e-6)
    loss.backward()
    assert torch.allclose(log_probs.grad, -advantages * mask / 9, atol=1e-7)


# Toy policy: softmax over 3 actions with one logit vector theta; the sampled action is 0.
THETA = [0.3, -0.2, 0.1]


def toy_loss(theta, *, ratio, advantage, dual_clip=None):
    """Loss for action 0 with pi_old(0) chosen so that pi_theta(0) / pi_old(0) == ratio at THETA."""
    log_pi = torch.log_softmax(theta, dim=-1)[0]
    old = math.log(torch.softmax(torch.tensor(THETA, dtype=torch.float64), -1)[0].item()) - math.log(ratio)
    loss, _ = clipped_policy_loss(
        log_probs=log_pi.reshape(1, 1),
        old_log_probs=torch.tensor([[old]], dtype=torch.float64),
        advantages=torch.tensor([[advantage]], dtype=torch.float64),
        response_mask=torch.ones(1, 1),
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=dual_clip,
    )
    return loss


@pytest.mark.parametrize(
    "ratio, advantage, dual_clip, active",
    [
        (1.1, 1.0, None, True),  # inside the region: gradient
        (1.5, 1.0, None, False),  # A > 0 above 1 + clip_high: clipped, no gradient
        (0.5, -1.0, None, False),  # A < 0 below 1 - clip_low: clipped, no gradient
        (1.5, -1.0, None, True),  # A < 0 above the region: PPO keeps the gradient (pessimistic bound)
        (0.5, 1.0, None, True),  # A > 0 below the region: gradient
        (4.0, -1.0, None, True),  # A < 0, ratio exploded, no dual-clip: gradient
        (4.0, -1.0, 3.0, False),  # ... with dual-clip c = 3: capped, no gradient
    ],
)
def test_toy_policy_gradient_against_analytic_and_finite_difference(ratio, advantage, dual_clip, active):
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    toy_loss(theta, ratio=ratio, advantage=advantage, dual_clip=dual_clip).backward()
    pi = torch.softmax(torch.tensor(THETA, dtype=torch.float64), -1)
    one_hot = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # d(-A r)/dtheta = -A r dlog pi(0)/dtheta = -A r (e_0 - pi); 0 where the clip (or dual-clip) is active.
    analytic = -advantage * ratio * (one_hot - pi) if active else torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(theta.grad, analytic, atol=1e-10)
    # descent raises pi(0) iff the advantage is positive
    if active:
        assert (theta.grad[0] < 0) == (advantage > 0)
    step = 1e-6
    for i in range(3):
        plus, minus = list(THETA), list(THETA)
        plus[i] += step
        minus[i] -= step
        value = lambda t: float(
            toy_loss(torch.tensor(t, dtype=torch.float64), ratio=ratio, advantage=advantage, dual_clip=dual_clip)
        )
        finite_difference = (value(plus) - value(minus)) / (2 * step)
        assert finite_difference == pytest.approx(float(analytic[i]), abs=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS.names())
def test_micro_batches_with_global_denominators_sum_to_the_full_loss(mode):
    generator = torch.Generator().manual_seed(2)
    loss = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    mask = (torch.rand(6, 7, generator=generator) > 0.3).double()
    mask[4] = 0  # an empty sequence (e.g. an overlong one filtered out) counts in no sequence mean
    full = aggregate_loss(loss, mask, mode=mode, max_response_length_tokens=7)
    num_tokens = float(mask.sum())
    num_sequences = float((mask.sum(-1) > 0).sum())
    parts = [
        aggregate_loss(
            loss[s],
            mask[s],
            mode=mode,
            max_response_length_tokens=7,
            global_num_tokens=num_tokens,
            global_num_sequences=num_sequences,
        )
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert float(sum(parts)) == pytest.approx(float(full), abs=1e-12)


def test_aggregation_weights_are_weights():
    # token-mean with weights (0.5, 1, 0): (0.5*2 + 1*4) / 1.5
    got = aggregate_loss(torch.tensor([[2.0, 4.0, 100.0]]), torch.tensor([[0.5, 1.0, 0.0]]), mode="token-mean")
    assert float(got) == pytest.approx(5.0 / 1.5)


def test_empty_mask_gives_zero_not_nan():
    for mode in LOSS_AGGREGATIONS.names():
        got = aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3), mode=mode)
        assert float(got) == 0.0, mode
    _, m = clipped_policy_loss(
        log_probs=torch.zeros(1, 2),
        old_log_probs=torch.zeros(1, 2),
        advantages=torch.ones(1, 2),
        response_mask=torch.zeros(1, 2),
    )
    assert float(m["ratio_min"]) == float(m["ratio_max"]) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'token_mean' \\(did you mean 'token-mean'"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), mode="token_mean")
    with pytest.raises(ValueError, match="advantages has shape \\[1, 2\\], log_probs has \\[1, 3\\]"):
        clipped_policy_loss(
            log_probs=torch.zeros(1, 3),
            old_log_probs=torch.zeros(1, 3),
            advantages=torch.zeros(1, 2),
            response_mask=torch.ones(1, 3),
        )
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        example(dual_clip=0.9)


def naive_entropy(row):
    z = [float(v) for v in row]
    top = max(z)
    total = sum(math.exp(v - top) for v in z)
    probs = [math.exp(v - top) / total for v in z]
    return -sum(p * math.log(p) for p in probs)


def test_entropy_against_python_loop_and_uniform():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=generator) * 4
    got = entropy_from_logits(logits)
    for i in range(2):
        for t in range(3):
            assert float(got[i, t]) == pytest.approx(naive_entropy(logits[i, t]), abs=1e-5)
    assert float(entropy_from_logits(torch.zeros(7))) == pytest.approx(math.log(7), abs=1e-6)


def test_chunked_entropy_values_and_gradients():
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 4, 6, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    weights = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    chunked = entropy_from_logits_chunked(logits, chunk_size_tokens=3)  # 8 tokens: chunks of 3, 3, 2
    # independent reference: H = -sum p log p from log_softmax
    log_p = torch.log_softmax(logits, dim=-1)
    reference = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(chunked.double(), reference, atol=1e-6)
    (grad_chunked,) = torch.autograd.grad((chunked.double() * weights).sum(), logits)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), logits)
    assert torch.allclose(grad_chunked, grad_reference, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(entropy_from_logits_chunked(logits, chunk_size_tokens=5).double(), reference, atol=1e-6)


def test_token_log_probs_against_python_loop():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, generator=generator)
    tokens = torch.randint(0, 4, (2, 3), generator=generator)
    got = token_log_probs_from_logits(logits, tokens)
    for i in range(2):
        for t in range(3):
            row = [float(v) for v in logits[i, t]]
            expected = row[int(tokens[i, t])] - math.log(sum(math.exp(v) for v in row))
            assert float(got[i, t]) == pytest.approx(expected, abs=1e-5)


def test_overlong_filter_zeroes_truncated_rows():
    mask = torch.ones(3, 2)
    got = apply_overlong_filter(mask, torch.tensor([False, True, False]))
    assert got.tolist() == [[1, 1], [0, 0], [1, 1]]


def test_grpo_loss_combines_terms_by_hand():
    # ratio 1, A = 1 on both tokens -> pg loss -1 (token-mean).
    # ref/pi = 0.5 and 2: k3 = (0.5 - 1 + ln 2) + (2 - 1 - ln 2) = 0.5 over 2 tokens -> 0.25.
    # entropy mean (1 + 2) / 2 = 1.5.  loss = -1 + 0.1 * 0.25 - 0.01 * 1.5 = -0.99
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    loss, m = compute_grpo_loss(
        config=config,
        log_probs=log_probs,
        old_log_probs=log_probs.clone(),
        advantages=torch.ones(1, 2),
        response_mask=torch.ones(1, 2),
        ref_log_probs=torch.tensor([[math.log(0.25), math.log(0.5)]]),
        entropy=torch.tensor([[1.0, 2.0]]),
    )
    assert float(loss) == pytest.approx(-0.99, abs=1e-6)
    assert float(m["kl"]) == pytest.approx(0.25, abs=1e-6)
    assert float(m["entropy"]) == pytest.approx(1.5)
    assert float(m["pg_loss"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_log_probs"):
        compute_grpo_loss(
            config=config,
            log_probs=log_probs,
            old_log_probs=log_probs,
            advantages=torch.ones(1, 2),
            response_mask=torch.ones(1, 2),
        )
