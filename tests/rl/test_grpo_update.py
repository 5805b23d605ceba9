"""GRPO with a real megatron-core model in one process (gloo, tp=1): vocab-parallel log-probs and entropy against
``log_softmax``; the update through ``forward_backward_func`` against a naive autograd gradient of the same loss
(importance ratio exactly 1 on the first update); tree rollouts grown with the real generation engine."""

from __future__ import annotations

import socket

import pytest
import torch

from betterai_megatron.platform.cpu import enable_cpu_execution

PROMPT = [5, 6, 7, 8]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world():
    enable_cpu_execution()
    torch.set_num_threads(1)
    import torch.distributed as dist

    if not dist.is_initialized():
        # private rendezvous: never export MASTER_PORT, which child processes would inherit while in use
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    yield


def build_policy(overrides=()):
    """A tiny policy (DDP-wrapped, megatron optimiser) from the config tree, as the GRPO stage builds it."""
    from betterai_megatron.config import load_config
    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import initialize_parallel
    from betterai_megatron.training.optimizer import build_optimizer
    from betterai_megatron.training.trainer import attach_schedule_hooks, wrap_with_ddp

    config = load_config(None, ["model.preset=tiny", "data.mock=true", "train.seq_length=64", "train.seed=7",
                                "train.optimizer=sgd", "train.lr=1.0", "train.weight_decay=0.0", "train.clip_grad=0.0",
                                "train.micro_batch_size=2", "train.global_batch_size=2",
                                "model.init_method_std=0.2", *overrides])
    initialize_parallel(config.parallel, seed=config.train.seed)
    chunks, transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                    seq_length=config.train.seq_length, seed=config.train.seed)
    chunks = wrap_with_ddp(chunks, transformer_config=transformer_config, config=config)
    optimizer = build_optimizer(train=config.train, model=config.model, parallel=config.parallel, chunks=chunks)
    attach_schedule_hooks(transformer_config, chunks=chunks, optimizer=optimizer, config=config)
    return config, chunks, optimizer


def test_vocab_parallel_log_probs_and_entropy_match_log_softmax(world):
    from betterai_megatron.rl.policy_update import (
        entropy_vocab_parallel,
        token_log_probs_vocab_parallel,
    )

    _, chunks, _ = build_policy()
    tokens = torch.randint(0, 500, (3, 16))
    positions = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        logits = chunks[0](tokens, positions, None)
        reference = torch.log_softmax(logits.double(), dim=-1)
        labels = torch.randint(0, logits.shape[-1], (3, 16))
        expected_lp = reference.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        expected_entropy = -(reference.exp() * reference).sum(-1)
        entropy = entropy_vocab_parallel(logits)
        log_probs = token_log_probs_vocab_parallel(logits.clone(), labels)
    assert torch.allclose(log_probs.double(), expected_lp, atol=1e-5)
    assert torch.allclose(entropy.double(), expected_entropy, atol=1e-5)


def _trajectories(lengths, advantages, weights=None):
    from betterai_megatron.rl.rollout import Trajectory

    out = []
    generator = torch.Generator().manual_seed(0)
    for index, (length, advantage) in enumerate(zip(lengths, advantages)):
        response = torch.randint(0, 500, (length,), generator=generator).tolist()
        t = Trajectory(problem=None, group_id=0, leaf=index + 1, prompt_token_ids=PROMPT[: 2 + index % 3],
                       response_token_ids=response, finish_reason="stop")
        t.token_advantages = torch.full((length,), float(advantage))
        t.token_weights = torch.ones(length) if weights is None else torch.tensor(weights[index])
        out.append(t)
    return out


def _naive_gradient(module, trajectories, *, mode: str):
    """d/dtheta of the GRPO loss at ratio 1, computed row by row with plain autograd and log_softmax
    (``torch.autograd.grad``, so megatron DDP's gradient hooks are not involved)."""
    per_token, weights = [], []
    for t in trajectories:
        sequence = torch.tensor(t.prompt_token_ids + t.response_token_ids)
        inputs = sequence[:-1].unsqueeze(0)
        logits = module(inputs, torch.arange(inputs.shape[1]).unsqueeze(0), None)[0]
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, sequence[1:].unsqueeze(-1)).squeeze(-1)
        response_lp = log_probs[len(t.prompt_token_ids) - 1:]
        ratio = torch.exp(response_lp - response_lp.detach())  # pi / pi_old with pi_old = pi: value 1, grad d log pi
        per_token.append(-t.token_advantages * ratio)
        weights.append(t.token_weights)
    if mode == "token-mean":
        loss = sum((l * w).sum() for l, w in zip(per_token, weights)) / sum(w.sum() for w in weights)
    else:  # seq-mean-token-mean
        loss = sum((l * w).sum() / w.sum() for l, w in zip(per_token, weights)) / len(per_token)
    names, params = zip(*module.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_update_applies_the_naive_gradient_with_ratio_one(world, mode):
    """5 trajectories, micro-batches of 2 (the last padded with a zero-weight row), one SGD step: the parameter
    change over the learning rate must be minus the naive gradient of the aggregated loss, and the first ratio
    exactly 1. (A large learning rate keeps the fp32 rounding of ``before - after`` far below the step.)"""
    from betterai_megatron.rl.algo_config import GRPOLossConfig
    from betterai_megatron.rl.policy_update import (
        UpdatePlan,
        build_mini_batches,
        compute_log_probs,
        run_policy_updates,
    )

    lr = 1000.0
    _, chunks, optimizer = build_policy([f"train.lr={lr}"])
    module = chunks[0].module
    trajectories = _trajectories([3, 5, 2, 6, 4], [1.0, -0.5, 2.0, -1.5, 0.25],
                                 weights=[[1, 1, 1], [1, 0, 1, 1, 1], [1, 1], [0.5] * 6, [1, 1, 1, 0]])
    expected = _naive_gradient(module, trajectories, mode=mode)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    plan = UpdatePlan(micro_batch_size=2, mini_batch_size_trajectories=5, epochs=1, shuffle=True, seed=1)
    mini_batches = build_mini_batches(trajectories, plan=plan, overlong_filtering=False)
    assert len(mini_batches[0].micro_batches) == 3
    compute_log_probs(chunks[0], mini_batches, key="old_log_probs")
    grpo = GRPOLossConfig(loss_agg_mode=mode, clip_low=0.2, clip_high=0.28)
    result = run_policy_updates(chunks=chunks, optimizer=optimizer, mini_batches=mini_batches, grpo=grpo, plan=plan)
    assert result.optimizer_steps == 1
    assert result.first_ratio_min == 1.0 and result.first_ratio_max == 1.0
    assert result.metrics["clip_fraction"] == 0.0
    for name, p in module.named_parameters():
        step = (before[name] - p.detach()) / lr
        error = float((step - expected[name]).norm() / expected[name].norm())
        assert error < 1e-4, (name, error)  # a wrong scale or a missing micro-batch would be O(1)


def test_second_epoch_moves_the_ratio_and_clips(world):
    """A large step makes the second pass see ratios != 1; the clipped fraction is then reported."""
    from betterai_megatron.rl.algo_config import GRPOLossConfig
    from betterai_megatron.rl.policy_update import (
        UpdatePlan,
        build_mini_batches,
        compute_log_probs,
        run_policy_updates,
    )

    _, chunks, optimizer = build_policy(["train.lr=20.0"])
    trajectories = _trajectories([4, 4, 4, 4], [1.0, -1.0, 1.0, -1.0])
    plan = UpdatePlan(micro_batch_size=2, mini_batch_size_trajectories=4, epochs=2, shuffle=False)
    mini_batches = build_mini_batches(trajectories, plan=plan, overlong_filtering=False)
    compute_log_probs(chunks[0], mini_batches, key="old_log_probs")
    result = run_policy_updates(chunks=chunks, optimizer=optimizer, mini_batches=mini_batches,
                                grpo=GRPOLossConfig(), plan=plan)
    assert result.optimizer_steps == 2
    assert (result.first_ratio_min, result.first_ratio_max) == (1.0, 1.0)
    assert result.metrics["ratio_max"] > 1.0 or result.metrics["ratio_min"] < 1.0
    assert result.metrics["approx_kl"] > 0.0


# ------------------------------------------------------------------------------------------------ tree rollouts

@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from benchmarks.grpo_warmup import generator_problems, train_small_tokenizer
    from betterai_megatron.data.tokenizer import build_tokenizer

    problems = generator_problems([1])[:60]
    path = train_small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", problems, vocab_size=384)
    return build_tokenizer("SentencePieceTokenizer", path), problems


def test_tree_rollouts_share_prefixes_and_keep_sampled_log_probs(world, small_tokenizer):
    from betterai_megatron.data.chat_template import ChatTemplate
    from betterai_megatron.inference.config import GenerationConfig
    from betterai_megatron.inference.engine import GenerationEngine
    from betterai_megatron.rl.rollout import RolloutConfig, RolloutSampler

    tokenizer, problems = small_tokenizer
    _, chunks, _ = build_policy([f"model.vocab_size={tokenizer.vocab_size}", "train.seq_length=256",
                                 "model.init_method_std=0.02"])
    config = RolloutConfig(samples_per_prompt=2, max_new_tokens=40, tree={"depth": 3, "branching": 2,
                                                                          "min_continuation_tokens": 4})
    template = ChatTemplate(tokenizer, reasoning=True)
    sampler = RolloutSampler(engine=GenerationEngine(chunks[0], tokenizer=tokenizer, config=GenerationConfig()),
                             tokenizer=tokenizer, template=template, config=config, seed=3)
    groups = sampler.sample(problems[:2], step=1, round_index=0, first_group_id=0)
    forks = 0
    for group in groups:
        tree, children = group.tree, group.tree.children()
        leaves = tree.leaves()
        assert 2 <= len(leaves) <= 8 and [t.leaf for t in group.trajectories] == leaves
        assert len(children[0]) == 2
        for node in range(1, tree.num_nodes):
            assert len(children[node]) in (0, 2)  # a branch point has the tail plus branching - 1 new samples
            forks += len(children[node]) > 0
        for t in group.trajectories:
            path_tokens = [tok for node in tree.path(t.leaf) for tok in tree.segments[node]]
            assert t.response_token_ids == path_tokens
            assert len(t.response_token_ids) <= config.max_new_tokens
            assert len(t.sampled_log_probs) == len(t.response_token_ids)
            assert len(tree.path(t.leaf)) <= 3
    assert forks > 0
    # the sampled log-probs of every path (prefix from the parent, rest from the continuation) are the model's
    module = chunks[0].module
    for t in [t for g in groups for t in g.trajectories][:6]:
        sequence = torch.tensor(t.prompt_token_ids + t.response_token_ids)
        with torch.no_grad():
            logits = module(sequence[:-1].unsqueeze(0), torch.arange(len(sequence) - 1).unsqueeze(0), None)[0]
        log_probs = torch.log_softmax(logits.double(), -1).gather(-1, sequence[1:].unsqueeze(-1)).squeeze(-1)
        expected = log_probs[len(t.prompt_token_ids) - 1:]
        assert torch.allclose(torch.tensor(t.sampled_log_probs, dtype=torch.float64), expected, atol=1e-4)
