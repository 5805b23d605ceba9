"""Outcome advantages (GRPO, Dr. GRPO, RLOO) against values worked out by hand."""

import math

import pytest
import torch

from betterai_megatron.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_outcome_advantages,
)

SQRT3 = math.sqrt(3.0)


def test_grpo_group_normalised_with_unbiased_std():
    # group 0: [1, 0, 1, 0] -> mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3) -> +-0.5 * sqrt(3)
    # group 1: [2, 2] -> std 0 -> 0;  group 2: [3] alone -> 0 (no baseline)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    got = compute_outcome_advantages(rewards, estimator="grpo", group_index=groups, eps=0.0)
    h = 0.5 * SQRT3
    assert got.tolist() == pytest.approx([h, -h, h, -h, 0.0, 0.0, 0.0], abs=1e-6)


def test_grpo_eps_is_added_to_std():
    got = compute_outcome_advantages(torch.tensor([1.0, 0.0]), estimator="grpo", group_index=[7, 7], eps=0.5)
    # mean 0.5, unbiased std sqrt(0.5) -> 0.5 / (0.70710678 + 0.5)
    assert got.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 0.5), -0.5 / (math.sqrt(0.5) + 0.5)], abs=1e-6)


def test_groups_need_not_be_contiguous_and_may_be_labels():
    # group "a": [1, 0] -> mean .5, std sqrt(.5) -> +-0.70711; group "b": [5, 3] -> mean 4, std sqrt(2) -> +-0.70711
    rewards = torch.tensor([1.0, 5.0, 0.0, 3.0])
    got = compute_outcome_advantages(rewards, estimator="grpo", group_index=["a", "b", "a", "b"], eps=0.0)
    r = 1 / math.sqrt(2)
    assert got.tolist() == pytest.approx([r, r, -r, -r], abs=1e-6)


def test_dr_grpo_has_no_std_division():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    got = compute_outcome_advantages(rewards, estimator="dr_grpo", group_index=groups)
    assert got.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0])


def test_rloo_leave_one_out_baseline():
    # [1, 0, 1, 0]: 1 - (0 + 1 + 0)/3 = 2/3, 0 - 2/3 = -2/3.   [1, 2, 3]: 1 - 2.5, 2 - 2, 3 - 1.5.   [9]: 0.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 9.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    got = compute_outcome_advantages(rewards, estimator="rloo", group_index=groups)
    assert got.tolist() == pytest.approx([2 / 3, -2 / 3, 2 / 3, -2 / 3, -1.5, 0.0, 1.5, 0.0], abs=1e-6)


def test_two_dimensional_rewards_and_token_broadcast():
    # row 1: [2, 2, 2, 4] -> mean 2.5, deviations (-.5, -.5, -.5, 1.5), unbiased var 3/3 = 1
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 0, 0]] * 3 + [[1, 1, 1]])
    got = compute_outcome_advantages(rewards, estimator="grpo", response_mask=mask, eps=0.0)
    h = 0.5 * SQRT3
    expected = [[h, h, 0], [-h, -h, 0], [h, h, 0], [-h, -h, 0], [-0.5, 0, 0], [-0.5, 0, 0], [-0.5, 0, 0], [1.5] * 3]
    assert got.shape == (8, 3)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_vectorised_matches_python_loop_on_random_groups():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (40,), generator=generator).double()
    groups = torch.randint(0, 7, (40,), generator=generator)
    got = compute_outcome_advantages(rewards, estimator="grpo", group_index=groups, eps=1e-6)
    for i in range(40):
        members = [float(rewards[j]) for j in range(40) if groups[j] == groups[i]]
        if len(members) == 1:
            assert got[i] == 0
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
        assert float(got[i]) == pytest.approx((float(rewards[i]) - mean) / (std + 1e-6), abs=1e-9)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grp' \(did you mean 'grpo'\?\).*'rloo'"):
        compute_outcome_advantages(torch.zeros(2), estimator="grp", group_index=[0, 0])
    with pytest.raises(ValueError, match="NaN or inf at indices \\[1\\]"):
        compute_outcome_advantages(torch.tensor([0.0, float("nan")]), estimator="grpo", group_index=[0, 0])
    with pytest.raises(ValueError, match="3 labels for 2 rewards"):
        compute_outcome_advantages(torch.zeros(2), estimator="grpo", group_index=[0, 0, 1])
    with pytest.raises(ValueError, match="group_index"):
        compute_outcome_advantages(torch.zeros(2), estimator="grpo")


def test_registry_lists_the_three_estimators():
    assert ADVANTAGE_ESTIMATORS.names() == ("dr_grpo", "grpo", "rloo")


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_groups_of_equal_rewards_get_exactly_zero_even_without_eps(estimator):
    # mean(0.1, 0.1, 0.1) rounds to 0.10000000000000002, so r - mean is -1.4e-17, not 0; with eps = 0 a naive
    # (r - mean) / std returns -0.816 for every sample of this group.
    rewards = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    got = compute_outcome_advantages(rewards, estimator=estimator, group_index=[0, 0, 0], eps=0.0)
    assert got.tolist() == [0.0, 0.0, 0.0]
