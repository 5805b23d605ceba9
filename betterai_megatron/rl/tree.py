"""Tree-structured rollouts: the trajectory tree, its segment advantages, and its flattening into training paths.

A :class:`TrajectoryTree` holds one prompt's rollouts as a tree of token *segments*. Node 0 is the root and holds the
prompt (never trained); every other node is a response segment that continues its parent's text, and a node with
several children is a branch point (the continuations share the prefix and its KV cache). Each root-to-leaf path is
one complete trajectory, and only leaves carry rewards. Linear GRPO is the tree of depth 1: the prompt with
``samples_per_prompt`` leaf children (:meth:`TrajectoryTree.from_group`).

Segment advantages (:func:`segment_advantages`), after TreeRL (Hou et al. 2025, "TreeRL: LLM Reinforcement
Learning with On-Policy Tree Search", arXiv:2506.11902, its process-supervision section). With ``L(s)`` the
leaves under node ``s`` and ``V(s) = mean_{l in L(s)} r_l`` the value of ``s`` (the Monte-Carlo success rate of the
prefix ending at ``s``)::

    "local"   A(s) = V(s) - V(parent(s))      the subtree against its siblings: V(parent) is the leaf-weighted
                                              mean of the values of s and its siblings
    "global"  A(s) = V(s) - V(root)
    "treerl"  A(s) = (V(s) - V(root) + V(s) - V(parent(s))) / sqrt(|L(s)|)
              TreeRL's R(s_n) (global + local advantage, damped for prefixes shared by many leaves), exactly so
              with ``std_normalize`` off; the paper's rewards are 0/1 correctness, ours any scalar

and, when ``std_normalize`` is on, ``A(s) / (std(r_l over all leaves of the tree) + eps)`` (unbiased std, the
tree's "group" std). The default, ``"local"`` with ``std_normalize``, makes a depth-1 tree *exactly* GRPO:
``V(leaf) = r``, ``V(root) = mean r``, so ``A = (r - mean) / (std + eps)`` (tested). TreeRL's own formula gives
``2 (r - mean)`` at depth 1; its ``1/sqrt(|L(s)|)`` damps prefixes that recur in many paths.

Flattening (:func:`flatten_tree`): each leaf gives one training path -- the prompt, then the concatenated segments
from the root's child down to the leaf -- and every token carries its segment's advantage. A segment shared by
``k`` paths appears in ``k`` rows, so each token also gets a loss *weight* (it multiplies the response mask):

    "once"    (default) weight 1 in the first path through the segment (leaves in depth-first order), 0 in the
              others: every generated token is trained exactly once; the later paths keep it only as context.
    "split"   weight 1/k in each of the k paths (the same total weight, spread evenly).
    "repeat"  weight 1 in every path (TreeRL's training set: each path is an ordinary sample).

A prefix token has the same context, hence the same log-prob and ratio, in every path through it, so with the
token-sum based aggregations ("token-mean", "seq-mean-token-sum-norm") "once" and "split" give identical losses and
gradients; they differ under "seq-mean-token-mean", which normalises per path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

TREE_ADVANTAGE_MODES = ("local", "global", "treerl")
PREFIX_WEIGHTINGS = ("once", "split", "repeat")


@dataclass
class TrajectoryTree:
    """One prompt's tree of rollout segments; node ids are indices into the parallel lists below."""

    segments: list[list[int]] = field(default_factory=list)  # node -> token ids; segments[0] is the prompt
    parents: list[int] = field(default_factory=list)  # node -> parent node; parents[0] == -1
    texts: list[str] = field(default_factory=list)  # node -> decoded text (optional, for trajectory logs)
    rewards: dict[int, float] = field(default_factory=dict)  # leaf node -> outcome reward

    @classmethod
    def with_prompt(cls, prompt_token_ids: Sequence[int], *, text: str = "") -> TrajectoryTree:
        return cls(segments=[list(prompt_token_ids)], parents=[-1], texts=[text])

    @classmethod
    def from_group(
        cls, prompt_token_ids: Sequence[int], response_token_ids: Sequence[Sequence[int]], rewards: Sequence[float]
    ) -> TrajectoryTree:
        """The depth-1 tree of linear GRPO: ``samples_per_prompt`` responses, each a rewarded leaf."""
        if len(response_token_ids) != len(rewards):
            raise ValueError(f"{len(response_token_ids)} responses but {len(rewards)} rewards")
        tree = cls.with_prompt(prompt_token_ids)
        for tokens, reward in zip(response_token_ids, rewards):
            tree.set_reward(tree.add_segment(0, tokens), reward)
        return tree

    @property
    def num_nodes(self) -> int:
        return len(self.segments)

    def add_segment(self, parent: int, token_ids: Sequence[int], *, text: str = "") -> int:
        """Append a segment continuing ``parent``; returns the new node id."""
        if not 0 <= parent < self.num_nodes:
            raise ValueError(f"parent {parent} is not a node of this tree ({self.num_nodes} nodes)")
        if parent in self.rewards:
            raise ValueError(f"node {parent} has a reward (it is a leaf) and cannot get children")
        self.segments.append(list(token_ids))
        self.parents.append(parent)
        self.texts.append(text)
        return self.num_nodes - 1

    def split_segment(self, node: int, offset: int) -> int:
        """Cut ``node``'s segment at ``offset`` to branch there: ``node`` keeps ``tokens[:offset]``, a new child
        takes ``tokens[offset:]`` with ``node``'s children and reward. Returns the new child; further branches from
        the cut point are added as its siblings with :meth:`add_segment`."""
        if node == 0 or not 0 <= node < self.num_nodes:
            raise ValueError(f"cannot split node {node} (the root is the prompt)")
        tokens = self.segments[node]
        if not 0 < offset < len(tokens):
            raise ValueError(f"offset {offset} must lie strictly inside the segment of {len(tokens)} tokens")
        text = self.texts[node]
        self.segments[node] = tokens[:offset]
        self.texts[node] = ""
        self.segments.append(tokens[offset:])
        self.parents.append(node)
        self.texts.append(text)
        tail = self.num_nodes - 1
        for child in range(self.num_nodes - 1):
            if self.parents[child] == node:
                self.parents[child] = tail
        if node in self.rewards:
            self.rewards[tail] = self.rewards.pop(node)
        return tail

    def set_reward(self, node: int, reward: float) -> None:
        if not math.isfinite(reward):
            raise ValueError(f"reward of node {node} is {reward}")
        self.rewards[node] = float(reward)

    def children(self) -> list[list[int]]:
        """``children()[s]``: the children of node ``s`` in insertion order."""
        result: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                result[parent].append(node)
        return result

    def preorder(self) -> list[int]:
        """All nodes, parents before children, siblings in insertion order (depth-first)."""
        children, order, stack = self.children(), [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(children[node]))
        return order

    def leaves(self) -> list[int]:
        """Leaf nodes in depth-first order: the order of the paths :func:`flatten_tree` returns."""
        children = self.children()
        return [node for node in self.preorder() if node != 0 and not children[node]]

    def path(self, node: int) -> list[int]:
        """Node ids from the root's child down to ``node`` (the root, i.e. the prompt, is excluded)."""
        result = []
        while node > 0:
            result.append(node)
            node = self.parents[node]
        return result[::-1]

    def validate(self) -> None:
        """Every leaf has a reward and no inner node has one; the root has at least one child."""
        leaves = set(self.leaves())
        if not leaves:
            raise ValueError("the tree has no response segments")
        missing = sorted(leaves - self.rewards.keys())
        inner = sorted(self.rewards.keys() - leaves)
        if missing:
            raise ValueError(f"leaves without a reward: {missing}")
        if inner:
            raise ValueError(f"rewards on nodes that are not leaves: {inner}")


def subtree_values(tree: TrajectoryTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [N] float64, leaf_count [N] int64)``: mean leaf reward and number of leaves under every node."""
    tree.validate()
    reward_sum = [0.0] * tree.num_nodes
    leaf_count = [0] * tree.num_nodes
    for node, reward in tree.rewards.items():
        reward_sum[node], leaf_count[node] = reward, 1
    for node in reversed(tree.preorder()):  # children before parents
        parent = tree.parents[node]
        if parent >= 0:
            reward_sum[parent] += reward_sum[node]
            leaf_count[parent] += leaf_count[node]
    counts = torch.tensor(leaf_count, dtype=torch.int64)
    return torch.tensor(reward_sum, dtype=torch.float64) / counts, counts


def segment_advantages(
    tree: TrajectoryTree, *, mode: str = "local", std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantage of every node's segment, ``[N]`` float64 (0 for the root); formulas in the module docstring."""
    if mode not in TREE_ADVANTAGE_MODES:
        raise ValueError(f"unknown tree advantage mode {mode!r}; valid: {', '.join(TREE_ADVANTAGE_MODES)}")
    values, leaf_counts = subtree_values(tree)
    parents = torch.tensor(tree.parents[1:], dtype=torch.long)
    local = values[1:] - values[parents]
    global_ = values[1:] - values[0]
    if mode == "local":
        advantages = local
    elif mode == "global":
        advantages = global_
    else:
        advantages = (local + global_) / leaf_counts[1:].to(torch.float64).sqrt()
    if std_normalize:
        leaf_rewards = torch.tensor(list(tree.rewards.values()), dtype=torch.float64)
        std = leaf_rewards.std() if leaf_rewards.numel() > 1 else torch.zeros((), dtype=torch.float64)
        advantages = advantages / (std + eps)
    return torch.cat([torch.zeros(1, dtype=torch.float64), advantages])


@dataclass
class TreePath:
    """One root-to-leaf trajectory of a tree, ready for the trainer (``L`` = response tokens of the path)."""

    leaf: int
    reward: float
    prompt_token_ids: list[int]
    response_token_ids: list[int]  # [L] the path's segments concatenated
    token_node_ids: list[int]  # [L] the segment each token belongs to
    token_advantages: torch.Tensor  # [L] float32, the advantage of the token's segment
    token_weights: torch.Tensor  # [L] float32, multiplies the response mask (prefix_weighting)


def flatten_tree(tree: TrajectoryTree, advantages: torch.Tensor, *, prefix_weighting: str = "once") -> list[TreePath]:
    """One :class:`TreePath` per leaf (depth-first order) from node advantages ``[N]`` (:func:`segment_advantages`).

    ``prefix_weighting`` ("once" | "split" | "repeat") sets the weight of segments shared by several paths; see the
    module docstring.
    """
    if prefix_weighting not in PREFIX_WEIGHTINGS:
        raise ValueError(f"unknown prefix_weighting {prefix_weighting!r}; valid: {', '.join(PREFIX_WEIGHTINGS)}")
    if advantages.shape != (tree.num_nodes,):
        raise ValueError(f"advantages must have shape [{tree.num_nodes}], got {list(advantages.shape)}")
    _, leaf_counts = subtree_values(tree)
    first_leaf: dict[int, int] = {}
    paths = []
    for leaf in tree.leaves():
        nodes = tree.path(leaf)
        tokens, node_ids, weights = [], [], []
        for node in nodes:
            if prefix_weighting == "once":
                weight = 1.0 if first_leaf.setdefault(node, leaf) == leaf else 0.0
            elif prefix_weighting == "split":
                weight = 1.0 / int(leaf_counts[node])
            else:
                weight = 1.0
            tokens += tree.segments[node]
            node_ids += [node] * len(tree.segments[node])
            weights += [weight] * len(tree.segments[node])
        index = torch.tensor(node_ids, dtype=torch.long)
        paths.append(
            TreePath(
                leaf=leaf,
                reward=tree.rewards[leaf],
                prompt_token_ids=list(tree.segments[0]),
                response_token_ids=tokens,
                token_node_ids=node_ids,
                token_advantages=advantages.to(torch.float32)[index],
                token_weights=torch.tensor(weights, dtype=torch.float32),
            )
        )
    return paths


@dataclass
class TreeBatch:
    """Right-padded tensors of a list of paths (``n`` paths, ``T`` the longest response)."""

    response_token_ids: torch.Tensor  # [n, T] int64, pad_token_id on padding
    advantages: torch.Tensor  # [n, T] float32, 0 on padding
    response_mask: torch.Tensor  # [n, T] float32 loss weights, 0 on padding
    rewards: torch.Tensor  # [n] float32


def collate_paths(paths: Sequence[TreePath], *, pad_token_id: int = 0, pad_to: int | None = None) -> TreeBatch:
    """Stack paths (from one or several trees) into :class:`TreeBatch` tensors, padding responses on the right."""
    length = max((len(p.response_token_ids) for p in paths), default=0)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest response ({length} tokens)")
        length = pad_to
    n = len(paths)
    token_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    advantages = torch.zeros(n, length)
    mask = torch.zeros(n, length)
    for row, path in enumerate(paths):
        size = len(path.response_token_ids)
        token_ids[row, :size] = torch.tensor(path.response_token_ids, dtype=torch.long)
        advantages[row, :size] = path.token_advantages
        mask[row, :size] = path.token_weights
    rewards = torch.tensor([p.reward for p in paths], dtype=torch.float32)
    return TreeBatch(response_token_ids=token_ids, advantages=advantages, response_mask=mask, rewards=rewards)
