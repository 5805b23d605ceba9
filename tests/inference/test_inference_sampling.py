"""Token selection math against hand-computed distributions (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from betterai_megatron.inference.sampling import (
    mask_padded_vocab,
    row_generators,
    sample_from_probabilities,
    sampling_probabilities,
    select_tokens,
    token_log_probs,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])


def _normalised(weights):
    total = sum(weights)
    return [w / total for w in weights]


def _assert_probs(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.shape == (1, len(expected))
    assert actual[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_temperature_one_is_softmax():
    expected = _normalised([math.exp(2), math.exp(1), math.exp(0), math.exp(-1)])
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0), expected)


def test_temperature_divides_logits():
    expected = _normalised([math.exp(1.0), math.exp(0.5), math.exp(0.0), math.exp(-0.5)])
    _assert_probs(sampling_probabilities(LOGITS, temperature=2.0), expected)


def test_top_k_keeps_k_largest_renormalised():
    expected = _normalised([math.exp(2), math.exp(1)]) + [0.0, 0.0]
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_k=2), expected)


def test_top_k_keeps_ties_with_kth_value():
    probs = sampling_probabilities(torch.tensor([[1.0, 1.0, 0.0, -1.0]]), temperature=1.0, top_k=1)
    _assert_probs(probs, [0.5, 0.5, 0.0, 0.0])


def test_top_p_keeps_smallest_prefix_reaching_mass():
    # softmax = [0.6439, 0.2369, 0.0871, 0.0321]: mass before token 2 is 0.6439 < 0.7, before token 3 is 0.8808.
    expected_two = _normalised([math.exp(2), math.exp(1)]) + [0.0, 0.0]
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_p=0.7), expected_two)
    # 0.6439 >= 0.6: only the most likely token stays.
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_p=0.6), [1.0, 0.0, 0.0, 0.0])
    # The most likely token always stays, however small top_p is.
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_p=1e-6), [1.0, 0.0, 0.0, 0.0])


def test_top_k_then_top_p_on_the_renormalised_distribution():
    # top-3 renormalised: [0.6652, 0.2447, 0.0900]; mass before the third is 0.9100 >= 0.9 -> two tokens remain.
    expected = _normalised([math.exp(2), math.exp(1)]) + [0.0, 0.0]
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_k=3, top_p=0.9), expected)
    # Without top-k, mass before the third token is 0.8808 < 0.9: three tokens remain.
    expected_three = _normalised([math.exp(2), math.exp(1), math.exp(0)]) + [0.0]
    _assert_probs(sampling_probabilities(LOGITS, temperature=1.0, top_p=0.9), expected_three)


def test_top_p_works_on_unsorted_rows_independently():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    probs = sampling_probabilities(logits, temperature=1.0, top_p=0.7)
    # Row 0 is LOGITS permuted: tokens 1 (logit 2) and 3 (logit 1) stay.
    first, second = _normalised([math.exp(2), math.exp(1)])
    assert probs[0].tolist() == pytest.approx([0.0, first, 0.0, second], abs=1e-6)
    # Uniform row, top_p 0.7: mass before the 3rd token is 0.5, before the 4th 0.75 -> 3 tokens of 1/3 each.
    assert probs[1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0], abs=1e-6)


def test_inverse_cdf_sample_matches_hand_computation():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    for seed in range(20):
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()
        cumulative, expected = 0.0, None
        for token, p in enumerate([0.1, 0.0, 0.6, 0.3]):
            cumulative += p
            if cumulative > u:
                expected = token
                break
        drawn = sample_from_probabilities(probs, [torch.Generator().manual_seed(seed)])
        assert drawn.tolist() == [expected]


def test_sample_frequencies_follow_distribution_and_skip_zero_probability():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_from_probabilities(probs, [generator]) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert counts[1].item() == 0.0
    assert counts.tolist() == pytest.approx([0.2, 0.0, 0.5, 0.3], abs=0.03)


def test_row_generators_depend_only_on_seed_and_index():
    def draws(seed, indices):
        return [torch.rand(3, generator=g).tolist() for g in row_generators(seed, indices)]

    assert draws(7, [0, 5]) == draws(7, [0, 5])
    assert draws(7, [5]) == draws(7, [0, 5])[1:]  # a row's stream does not depend on its batch neighbours
    assert draws(7, [0]) != draws(8, [0])
    assert draws(7, [0]) != draws(7, [1])


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [9.0, 0.0, 0.0, 0.0]])
    assert select_tokens(logits, temperature=0.0, top_k=0, top_p=1.0, generators=[]).tolist() == [1, 0]


def test_token_log_probs_are_log_softmax_of_unmodified_logits():
    tokens = torch.tensor([2])
    expected = 0.0 - math.log(math.exp(2) + math.exp(1) + math.exp(0) + math.exp(-1))
    assert token_log_probs(LOGITS, tokens).tolist() == pytest.approx([expected], abs=1e-6)


def test_padded_vocab_is_never_selected():
    logits = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    masked = mask_padded_vocab(logits, vocab_size=2)
    assert masked[0, 2:].tolist() == [float("-inf")] * 2
    assert select_tokens(masked, temperature=0.0, top_k=0, top_p=1.0, generators=[]).tolist() == [0]
    assert logits[0, 2].item() == 10.0  # the caller's logits (used for log-probs) are untouched
