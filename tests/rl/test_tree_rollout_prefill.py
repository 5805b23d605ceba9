"""Tree rollouts with prefix sharing: continuations of one branch point compute their shared prefix once
(``prefill_tokens`` counted by hand) and sample exactly what unshared generation samples.

A tiny megatron model (``inference.testing``) with the character tokenizer; the groups' first samples are built by
hand so that every trajectory has exactly one branch point (one newline), which makes the prompts of the
continuations, and so the prompt tokens the engine computes, known in advance.
"""

from __future__ import annotations

import socket

import pytest
import torch

from betterai_megatron.platform.cpu import enable_cpu_execution

MAX_NEW_TOKENS = 32
# (prompt, first samples): each response has one newline, so one branch point right after it
GROUPS = [("ABCDE", ["ab\ncdefgh", "xy\nzwvuts"]), ("QRSTU", ["q\nrstuvw"])]


@pytest.fixture(scope="module")
def tiny_policy():
    enable_cpu_execution()
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from betterai_megatron.inference.testing import CharTokenizer, tiny_gpt_model

    created = not dist.is_initialized()
    if created:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    initialized = parallel_state.model_parallel_is_initialized()
    if not initialized:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield tiny_gpt_model(layer_pattern="GA", vocab_size=128), CharTokenizer()
    if not initialized:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _grow(model, tokenizer, *, share: bool):
    """Grow the hand-built groups to depth 2, branching 3; returns (groups, prefill tokens of the continuations)."""
    from betterai_megatron.inference.config import GenerationConfig
    from betterai_megatron.inference.engine import GenerationEngine
    from betterai_megatron.rl.rollout import (
        RolloutConfig,
        RolloutGroup,
        RolloutSampler,
        Trajectory,
    )
    from betterai_megatron.rl.tree import TrajectoryTree
    from betterai_megatron.rl.tree_rollout import grow_trees

    config = RolloutConfig(samples_per_prompt=2, max_new_tokens=MAX_NEW_TOKENS,
                           tree={"depth": 2, "branching": 3, "min_continuation_tokens": 8})
    engine = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(share_prompt_prefixes=share))
    sampler = RolloutSampler(engine=engine, tokenizer=tokenizer, template=None, config=config, seed=5)
    groups = []
    for group_id, (prompt_text, responses) in enumerate(GROUPS):
        prompt = tokenizer.tokenize(prompt_text)
        tree = TrajectoryTree.with_prompt(prompt)
        trajectories = []
        for response in responses:
            tokens = tokenizer.tokenize(response)
            trajectories.append(Trajectory(problem=prompt_text, group_id=group_id, leaf=tree.add_segment(0, tokens),
                                           prompt_token_ids=prompt, response_token_ids=tokens, finish_reason="length",
                                           text=response, sampled_log_probs=[-1.0] * len(tokens)))
        groups.append(RolloutGroup(problem=prompt_text, group_id=group_id, round_index=0, tree=tree,
                                   trajectories=trajectories))
    grow_trees(groups, sampler=sampler, step=1, round_index=0)
    return groups, sampler.prefill_tokens


def test_continuations_share_their_prefix_and_sample_the_same(tiny_policy):
    """Continuation prompts (prompt + prefix up to the newline), 2 per branch point: "ABCDEab\\n" x2,
    "ABCDExy\\n" x2, "QRSTUq\\n" x2. Unshared: every prompt token, 2 * (8 + 8 + 7) = 46. Shared: the batch prefills
    its shortest prompt length, 7 tokens, once per distinct 7-token prefix ("ABCDEab", "ABCDExy", "QRSTUq\\n") = 21,
    then the forced "\\n" of the two "ABCDE" prefixes = 2: 23, i.e. each branch point's prefix once."""
    model, tokenizer = tiny_policy
    shared_groups, shared_prefill = _grow(model, tokenizer, share=True)
    unshared_groups, unshared_prefill = _grow(model, tokenizer, share=False)
    assert (unshared_prefill, shared_prefill) == (46, 23)
    for shared, unshared in zip(shared_groups, unshared_groups):
        assert shared.tree.segments == unshared.tree.segments
        assert len(shared.trajectories) == len(GROUPS[shared.group_id][1]) * 3  # the tail + 2 new per branch point
        for a, b in zip(shared.trajectories, unshared.trajectories):
            assert a.response_token_ids == b.response_token_ids
            assert a.sampled_log_probs == pytest.approx(b.sampled_log_probs, abs=1e-5)
