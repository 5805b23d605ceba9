"""Tree rollouts: values and advantages on a hand-built tree, flattening weights, and depth 1 == linear GRPO."""

import math

import pytest
import torch

from betterai_megatron.rl.advantages import compute_outcome_advantages
from betterai_megatron.rl.policy_loss import clipped_policy_loss
from betterai_megatron.rl.tree import (
    TrajectoryTree,
    collate_paths,
    flatten_tree,
    segment_advantages,
    subtree_values,
)


def hand_tree():
    """
    root [100, 101]                      (prompt)
     +- A [1, 2]           node 1
     |   +- A1 [3]         node 2  r=1
     |   +- A2 [4, 5]      node 3  r=0
     |   +- A3 [6]         node 4  r=1
     +- B [7]              node 5
         +- B1 [8, 9]      node 6  r=0
         +- B2 [10]        node 7  r=0
    """
    tree = TrajectoryTree.with_prompt([100, 101])
    a = tree.add_segment(0, [1, 2])
    for tokens, reward in (([3], 1.0), ([4, 5], 0.0), ([6], 1.0)):
        tree.set_reward(tree.add_segment(a, tokens), reward)
    b = tree.add_segment(0, [7])
    for tokens, reward in (([8, 9], 0.0), ([10], 0.0)):
        tree.set_reward(tree.add_segment(b, tokens), reward)
    return tree


# V(root) = 2/5, V(A) = 2/3, V(B) = 0, leaves their reward; leaf counts 5, 3, 1, 1, 1, 2, 1, 1.
V = [2 / 5, 2 / 3, 1, 0, 1, 0, 0, 0]
LOCAL = [0, 2 / 3 - 2 / 5, 1 - 2 / 3, 0 - 2 / 3, 1 - 2 / 3, 0 - 2 / 5, 0, 0]
GLOBAL = [0, 2 / 3 - 2 / 5, 1 - 2 / 5, 0 - 2 / 5, 1 - 2 / 5, 0 - 2 / 5, 0 - 2 / 5, 0 - 2 / 5]
TREERL = [0] + [(l + g) / math.sqrt(c) for l, g, c in zip(LOCAL[1:], GLOBAL[1:], [3, 1, 1, 1, 2, 1, 1])]
# leaf rewards (1, 0, 1, 0, 0): mean .4, squared deviations .36 + .16 + .36 + .16 + .16 = 1.2, unbiased var .3
LEAF_STD = math.sqrt(0.3)


def test_values_and_leaf_counts():
    values, counts = subtree_values(hand_tree())
    assert values.tolist() == pytest.approx(V)
    assert counts.tolist() == [5, 3, 1, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("mode, expected", [("local", LOCAL), ("global", GLOBAL), ("treerl", TREERL)])
def test_segment_advantages_by_hand(mode, expected):
    tree = hand_tree()
    assert segment_advantages(tree, mode=mode, std_normalize=False).tolist() == pytest.approx(expected)
    normalised = segment_advantages(tree, mode=mode, std_normalize=True, eps=0.0)
    assert normalised.tolist() == pytest.approx([e / LEAF_STD for e in expected])


def test_paths_and_prefix_weighting():
    tree = hand_tree()
    adv = torch.tensor(LOCAL, dtype=torch.float64)
    expected_tokens = [[1, 2, 3], [1, 2, 4, 5], [1, 2, 6], [7, 8, 9], [7, 10]]
    expected_nodes = [[1, 1, 2], [1, 1, 3, 3], [1, 1, 4], [5, 6, 6], [5, 7]]
    weights = {
        "once": [[1, 1, 1], [0, 0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1]],
        "split": [[1 / 3, 1 / 3, 1], [1 / 3, 1 / 3, 1, 1], [1 / 3, 1 / 3, 1], [0.5, 1, 1], [0.5, 1]],
        "repeat": [[1, 1, 1], [1, 1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1]],
    }
    for weighting, expected_weights in weights.items():
        paths = flatten_tree(tree, adv, prefix_weighting=weighting)
        assert [p.leaf for p in paths] == [2, 3, 4, 6, 7]
        assert [p.reward for p in paths] == [1, 0, 1, 0, 0]
        assert all(p.prompt_token_ids == [100, 101] for p in paths)
        assert [p.response_token_ids for p in paths] == expected_tokens
        assert [p.token_node_ids for p in paths] == expected_nodes
        for path, nodes, w in zip(paths, expected_nodes, expected_weights):
            assert path.token_weights.tolist() == pytest.approx(w)
            assert path.token_advantages.tolist() == pytest.approx([LOCAL[n] for n in nodes], abs=1e-7)


def test_once_and_split_train_every_generated_token_with_total_weight_one():
    tree = hand_tree()
    adv = segment_advantages(tree)
    for weighting in ("once", "split"):
        total = {}
        for path in flatten_tree(tree, adv, prefix_weighting=weighting):
            for node, weight in zip(path.token_node_ids, path.token_weights.tolist()):
                total[node] = total.get(node, 0.0) + weight
        lengths = {node: len(tree.segments[node]) for node in range(1, tree.num_nodes)}
        assert total == pytest.approx({node: float(n) for node, n in lengths.items()})


def once_vs_split(loss_agg_mode):
    """(loss, grad) under "once" and "split" for a toy model whose log-prob of a token is shared by every row
    that contains it (a prefix token has the same context, hence the same log-prob, in every path)."""
    tree = hand_tree()
    adv = segment_advantages(tree)
    results = []
    for weighting in ("once", "split"):
        batch = collate_paths(flatten_tree(tree, adv, prefix_weighting=weighting), pad_token_id=0)
        theta = torch.linspace(-1, 1, 11, dtype=torch.float64).requires_grad_()  # one parameter per token id 0..10
        log_probs = torch.nn.functional.logsigmoid(theta[batch.response_token_ids])
        old = log_probs.detach() + 0.1 * torch.cos(batch.response_token_ids.double())
        loss, _ = clipped_policy_loss(
            log_probs=log_probs,
            old_log_probs=old,
            advantages=batch.advantages.double(),
            response_mask=batch.response_mask,
            loss_agg_mode=loss_agg_mode,
        )
        loss.backward()
        results.append((float(loss.detach()), theta.grad.clone()))
    return results


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_once_and_split_give_the_same_loss_and_gradient_for_token_sum_aggregations(mode):
    (loss_once, grad_once), (loss_split, grad_split) = once_vs_split(mode)
    # equal up to the float32 rounding of the 1/3 weights
    assert loss_once == pytest.approx(loss_split, abs=1e-7)
    assert torch.allclose(grad_once, grad_split, atol=1e-7)
    assert grad_once.abs().sum() > 0


def test_once_and_split_differ_under_per_sequence_normalisation():
    (loss_once, _), (loss_split, _) = once_vs_split("seq-mean-token-mean")
    assert abs(loss_once - loss_split) > 1e-3


@pytest.mark.parametrize("estimator, std_normalize", [("grpo", True), ("dr_grpo", False)])
def test_depth_one_tree_is_exactly_linear_grpo(estimator, std_normalize):
    # Two prompts, 5 and 4 samples, responses of different lengths; GRPO on the padded batch vs the trees.
    prompts = [[11, 12], [13]]
    responses = [[[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [1]], [[2, 2], [3], [4, 4, 4], [5]]]
    rewards = [[1.0, 0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    paths = []
    for prompt, group_responses, group_rewards in zip(prompts, responses, rewards):
        tree = TrajectoryTree.from_group(prompt, group_responses, group_rewards)
        adv = segment_advantages(tree, mode="local", std_normalize=std_normalize, eps=1e-6)
        paths += flatten_tree(tree, adv, prefix_weighting="once")
    batch = collate_paths(paths, pad_to=6)

    flat_responses = [r for group in responses for r in group]
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (6 - len(r)) for r in flat_responses])
    group_index = torch.tensor([0] * 5 + [1] * 4)
    linear = compute_outcome_advantages(
        torch.tensor(rewards[0] + rewards[1]),
        estimator=estimator,
        response_mask=mask,
        group_index=group_index,
        eps=1e-6,
    )
    assert torch.equal(batch.response_mask, mask)
    assert torch.allclose(batch.advantages, linear, atol=1e-6)
    assert batch.response_token_ids[3].tolist() == [7, 8, 9, 10, 0, 0]
    assert batch.rewards.tolist() == rewards[0] + rewards[1]


def test_split_segment_keeps_paths_and_values():
    tree = TrajectoryTree.with_prompt([9])
    first = tree.add_segment(0, [1, 2, 3, 4], text="abcd")
    tree.set_reward(first, 1.0)
    tail = tree.split_segment(first, 2)  # branch after token 2
    tree.set_reward(tree.add_segment(first, [5]), 0.0)
    assert tree.segments[first] == [1, 2] and tree.segments[tail] == [3, 4]
    assert tree.rewards == {tail: 1.0, 3: 0.0}
    paths = flatten_tree(tree, segment_advantages(tree, std_normalize=False))
    assert [p.response_token_ids for p in paths] == [[1, 2, 3, 4], [1, 2, 5]]
    # V(first) = 0.5 = V(root): the shared prefix gets 0, the branches +-0.5
    assert paths[0].token_advantages.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert paths[1].token_advantages.tolist() == [0.0, 0.0, -0.5]


def test_invalid_trees_are_rejected():
    tree = TrajectoryTree.with_prompt([1])
    node = tree.add_segment(0, [2])
    with pytest.raises(ValueError, match=r"leaves without a reward: \[1\]"):
        segment_advantages(tree)
    tree.set_reward(node, 1.0)
    with pytest.raises(ValueError, match="is a leaf"):
        tree.add_segment(node, [3])
    with pytest.raises(ValueError, match="unknown tree advantage mode"):
        segment_advantages(tree, mode="sibling")
    with pytest.raises(ValueError, match="no response segments"):
        segment_advantages(TrajectoryTree.with_prompt([1]))
    with pytest.raises(ValueError, match="reward of node 1 is nan"):
        tree.set_reward(node, float("nan"))


def test_single_leaf_tree_has_zero_advantage():
    tree = TrajectoryTree.from_group([1], [[2, 3]], [1.0])
    assert segment_advantages(tree).tolist() == [0.0, 0.0]
