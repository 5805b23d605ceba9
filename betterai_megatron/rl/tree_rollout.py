"""Tree-structured rollouts ("non-linear reasoning paths"): branch sampled trajectories at reasoning-step boundaries.

The tree of one prompt is grown the way TreeRL's EPTree does it (Hou et al. 2025, arXiv:2506.11902, §3.1: sample
full responses, pick forking points inside them, re-sample continuations from those points), with reasoning-step
boundaries as the forking points instead of TreeRL's high-entropy tokens:

1. the ``samples_per_prompt`` linear samples of :meth:`RolloutSampler.sample` are the root's children;
2. ``depth - 1`` times, every leaf of the previous level is cut after one of its reasoning lines -- a token that
   holds a newline, before the closing ``</think>``, chosen uniformly at random among those at least
   ``rollout.tree.min_continuation_tokens`` away from the token budget -- with
   :meth:`~betterai_megatron.rl.tree.TrajectoryTree.split_segment`; the original tail stays as one child and
   ``branching - 1`` new continuations of the prefix are sampled as its siblings;
3. every root-to-leaf path is a complete response of at most ``rollout.max_new_tokens`` tokens: it is scored like
   a linear sample, and :func:`~betterai_megatron.rl.tree.segment_advantages` gives each segment the advantage of
   its subtree against its siblings.

A leaf with no eligible branch point (e.g. an answer without reasoning lines) is not branched further, so a tree
may have fewer than ``samples_per_prompt * branching ** (depth - 1)`` leaves.

KV-cache reuse. The continuations of one level go to the engine in one call per budget, and the engine shares
common prompt prefixes inside a batch (:mod:`betterai_megatron.inference.engine`, prefix sharing): rows that agree
on every token so far share one cached row, which is forked (``GenerationContext.fork_rows``: KV positions
``[0, prefix)`` of the softmax layers and the recurrent/conv states of the linear-attention layers copied into
new rows) where their tokens diverge. So the ``branching - 1`` continuations of one branch point compute
``prompt + prefix`` once, and all continuations of one group compute the problem prompt once (the
``samples_per_prompt`` first samples likewise share their prompt). ``RolloutSampler.prefill_tokens`` (metric
``prefill_tokens``) counts what the engine computed (``GenerationResult.prompt_tokens_computed``), so it shows the
saving. Sampled tokens and log-probs are those of unshared decoding (each row keeps its own random stream).

Not reused: the parent's cache from the *earlier* engine call. Branch points are chosen after a sample is
complete (uniformly among its reasoning lines), when that call's cache has moved past them -- reusing it would
mean keeping every row's KV cache and a recurrent-state snapshot at every candidate newline. So each branch point
still computes its ``prompt + prefix`` once more (instead of ``branching - 1`` times), on top of the earlier
call; the engine also prefills a batch only up to its shortest prompt and forces the rest one position per step.

Continuations of one level are batched in one engine call per remaining token budget (rounded down to a multiple
of :data:`BUDGET_QUANTUM_TOKENS`, which keeps the number of calls small; a path may therefore end up to 7 tokens
short of ``max_new_tokens``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from betterai_megatron.rl.rollout import (
    RolloutGroup,
    Trajectory,
    derived_seed,
    response_text,
)

BUDGET_QUANTUM_TOKENS = 8


class _NewlineTokens:
    """Whether a token id decodes to text containing a newline (cached per id)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        if token_id not in self._cache:
            self._cache[token_id] = "\n" in self.tokenizer.detokenize([token_id])
        return self._cache[token_id]


def branch_offsets(segment: Sequence[int], *, tokens_before: int, max_new_tokens: int, min_continuation_tokens: int,
                   is_newline, think_end_id: int | None, reasoning_closed: bool) -> list[int]:
    """Offsets ``j`` (``0 < j < len(segment)``) where ``segment`` may be cut: ``segment[j - 1]`` holds a newline,
    no ``</think>`` occurs before ``j`` (in this segment or, via ``reasoning_closed``, earlier in the path), and
    ``max_new_tokens - (tokens_before + j) >= min_continuation_tokens`` tokens are left for a continuation."""
    if reasoning_closed:
        return []
    offsets = []
    for j in range(1, len(segment)):
        token = segment[j - 1]
        if think_end_id is not None and token == think_end_id:
            break
        if max_new_tokens - (tokens_before + j) < min_continuation_tokens:
            break
        if is_newline(token):
            offsets.append(j)
    return offsets


def quantized_budget(remaining_tokens: int) -> int:
    """The token budget a continuation is sampled with: ``remaining`` rounded down to a multiple of
    :data:`BUDGET_QUANTUM_TOKENS` (or ``remaining`` itself when smaller)."""
    if remaining_tokens < BUDGET_QUANTUM_TOKENS:
        return remaining_tokens
    return remaining_tokens - remaining_tokens % BUDGET_QUANTUM_TOKENS


def grow_trees(groups: Sequence[RolloutGroup], *, sampler, step: int, round_index: int) -> None:
    """Branch the linear groups sampled by ``sampler`` into trees of ``rollout.tree.depth`` levels, in place."""
    config = sampler.config
    tree_config = config.tree
    rng = random.Random(derived_seed(sampler.seed, step, round_index, 7919))
    is_newline = _NewlineTokens(sampler.tokenizer)
    think_end_id = getattr(sampler.template, "think_end_id", None)
    frontier = [(group, trajectory) for group in groups for trajectory in group.trajectories]
    for level in range(2, tree_config.depth + 1):
        requests = []  # (group, parent node, prefix tokens of the path, their sampled log-probs, budget)
        next_frontier = []
        for group, trajectory in frontier:
            tree = group.tree
            node = trajectory.leaf
            path = tree.path(node)
            tokens_before = sum(len(tree.segments[n]) for n in path[:-1])
            closed = think_end_id is not None and any(think_end_id in tree.segments[n] for n in path[:-1])
            offsets = branch_offsets(tree.segments[node], tokens_before=tokens_before,
                                     max_new_tokens=config.max_new_tokens,
                                     min_continuation_tokens=tree_config.min_continuation_tokens,
                                     is_newline=is_newline, think_end_id=think_end_id, reasoning_closed=closed)
            if not offsets:
                continue
            offset = rng.choice(offsets)
            trajectory.leaf = tree.split_segment(node, offset)
            next_frontier.append((group, trajectory))
            prefix = trajectory.response_token_ids[:tokens_before + offset]
            prefix_log_probs = (trajectory.sampled_log_probs or [])[:tokens_before + offset]
            budget = quantized_budget(config.max_new_tokens - len(prefix))
            requests.extend((group, node, prefix, prefix_log_probs, budget)
                            for _ in range(tree_config.branching - 1))
        next_frontier += _sample_continuations(requests, sampler=sampler, step=step, round_index=round_index,
                                               level=level)
        frontier = next_frontier
    for group in groups:
        by_leaf = {t.leaf: t for t in group.trajectories}
        group.trajectories = [by_leaf[leaf] for leaf in group.tree.leaves()]


def _sample_continuations(requests, *, sampler, step: int, round_index: int, level: int) -> list:
    """Sample every requested continuation (one engine call per budget) and add them to their trees."""
    by_budget: dict[int, list] = defaultdict(list)
    for request in requests:
        by_budget[request[-1]].append(request)
    added = []
    for budget in sorted(by_budget):
        batch = by_budget[budget]
        prompts = [group.tree.segments[0] + prefix for group, _, prefix, _, _ in batch]
        prefill_before = sampler.prefill_tokens
        results = sampler.generate(prompts, max_new_tokens=budget,
                                   seed=derived_seed(sampler.seed, step, round_index, level, budget))
        # What the engine computed: shared prefixes once (RolloutSampler.generate may count every prompt token).
        sampler.prefill_tokens = prefill_before + sum(r.prompt_tokens_computed for r in results)
        for (group, parent, prefix, prefix_log_probs, _), result in zip(batch, results):
            leaf = group.tree.add_segment(parent, result.tokens)
            tokens = list(prefix) + list(result.tokens)
            trajectory = Trajectory(problem=group.problem, group_id=group.group_id, leaf=leaf,
                                    prompt_token_ids=list(group.tree.segments[0]), response_token_ids=tokens,
                                    finish_reason=result.finish_reason,
                                    text=response_text(sampler.tokenizer, tokens, sampler.stop_strings),
                                    sampled_log_probs=list(prefix_log_probs) + list(result.log_probs))
            group.trajectories.append(trajectory)
            added.append((group, trajectory))
    return added
