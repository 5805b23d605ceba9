"""KL estimators k1/k2/k3: hand values, exact expectations on a small distribution, and what their gradients estimate."""

import math

import pytest
import torch

from betterai_megatron.rl.kl import KL_ESTIMATORS, kl_penalty

LN2 = math.log(2.0)


def test_hand_values():
    # token 0: pi = 0.5, ref = 0.25 (log_r = -ln 2);  token 1: pi = 0.2, ref = 0.4 (log_r = +ln 2)
    log_probs = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]], dtype=torch.float64)
    assert kl_penalty(log_probs, ref, estimator="k1").tolist()[0] == pytest.approx([LN2, -LN2])
    assert kl_penalty(log_probs, ref, estimator="k2").tolist()[0] == pytest.approx([LN2**2 / 2, LN2**2 / 2])
    assert kl_penalty(log_probs, ref, estimator="k3").tolist()[0] == pytest.approx([0.5 - 1 + LN2, 2 - 1 - LN2])


def test_clamp_and_extreme_ratios():
    log_probs = torch.tensor([[0.0, -100.0]])
    ref = torch.tensor([[-3.0, 0.0]])
    assert kl_penalty(log_probs, ref, estimator="k1", clamp=0.5).tolist()[0] == pytest.approx([0.5, -0.5])
    k3 = kl_penalty(log_probs, ref, estimator="k3")
    assert torch.isfinite(k3).all()  # log_r = 100 is clamped to 20 before exp
    assert float(k3[0, 1]) == pytest.approx(math.exp(20) - 1 - 20, rel=1e-5)
    assert float(kl_penalty(log_probs, ref, estimator="k3", clamp=10.0)[0, 1]) == 10.0


P = [0.5, 0.3, 0.2]
Q = [0.25, 0.25, 0.5]


def exact_expectation(estimator):
    """E_{x ~ p}[k(x)] over the three outcomes, as a plain sum."""
    log_p = torch.tensor([P], dtype=torch.float64).log()
    log_q = torch.tensor([Q], dtype=torch.float64).log()
    return sum(p * k for p, k in zip(P, kl_penalty(log_p, log_q, estimator=estimator).tolist()[0]))


def test_k1_and_k3_are_unbiased_k2_is_not():
    true_kl = sum(p * math.log(p / q) for p, q in zip(P, Q))
    assert exact_expectation("k1") == pytest.approx(true_kl, abs=1e-12)
    assert exact_expectation("k3") == pytest.approx(true_kl, abs=1e-12)
    assert abs(exact_expectation("k2") - true_kl) > 1e-3


def expected_gradient(estimator):
    """grad_theta of E_{x ~ p_theta}[k(x)] with the sampling weights held fixed (a loss term on samples)."""
    theta = torch.tensor([0.4, -0.1, 0.2], dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(theta, -1)
    log_q = torch.tensor(Q, dtype=torch.float64).log()
    k = kl_penalty(log_p[None], log_q[None], estimator=estimator)[0]
    (log_p.detach().exp() * k).sum().backward()
    return theta.grad


def kl_gradient(forward: bool):
    theta = torch.tensor([0.4, -0.1, 0.2], dtype=torch.float64, requires_grad=True)
    p = torch.softmax(theta, -1)
    q = torch.tensor(Q, dtype=torch.float64)
    kl = (q * (q / p).log()).sum() if forward else (p * (p / q).log()).sum()
    kl.backward()
    return theta.grad


def test_gradient_claims_of_the_docstring():
    assert torch.allclose(expected_gradient("k1"), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(expected_gradient("k2"), kl_gradient(forward=False), atol=1e-12)  # reverse KL
    assert torch.allclose(expected_gradient("k3"), kl_gradient(forward=True), atol=1e-12)  # forward KL


def test_errors():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*valid names: 'k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), estimator="k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 1))
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
