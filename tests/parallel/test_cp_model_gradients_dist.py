"""Whole-model gradients of one step with context parallelism equal the single-rank gradients (issue 6).

One ``torchrun --nproc-per-node 4`` launch (gloo). For each model -- the tiny dense preset (softmax attention,
causal, GQA 4 heads / 2 groups), the Qwen3-Next-style hybrid ``GGGA`` and the mix ``DLGA`` (DeltaNet, GLA, Gated
DeltaNet, softmax) -- every rank first builds the model at tp=1, cp=1 (megatron-core's local attention with an
explicit causal mask written here) and computes the reference gradients of a token-weighted cross-entropy on the
whole sequence. Then it builds the same model (same seed, layout-invariant init) at cp=2, cp=4 and cp=2 x tp=2
(without and with sequence parallelism), feeds its CP slice (positions written out here, chunks ``i`` and
``2 cp - 1 - i``), back-propagates its part of the same loss, sums the gradients over the CP group (and the
QK-norm and sequence-parallel gradients over TP, as megatron-core's ``finalize_model_grads`` does), and compares
every parameter with the reference (its TP shard of it), 1e-4 relative to the tensor's largest entry.

The worker half of this file runs under ``__main__``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

RTOL = 1e-4
MODELS = {"dense": [], "GGGA": ["model.layer_pattern=GGGA"], "DLGA": ["model.layer_pattern=DLGA"]}
LAYOUTS = ((2, 1, False), (4, 1, False), (2, 2, False), (2, 2, True))  # (cp, tp, sequence parallel) on 4 ranks
SEQ_LENGTH, MICRO_BATCH = 64, 2
TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def worker_output() -> str:
    # imported here, not at the top: this file is also torchrun's worker script, run outside the tests package
    from tests.conftest import run_torchrun_worker

    return run_torchrun_worker(__file__, nproc=4, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("cp,tp,sp", LAYOUTS)
@pytest.mark.parametrize("model", list(MODELS))
def test_one_step_gradients_match_single_rank(worker_output, model, cp, tp, sp):
    assert worker_output.count(f"OK grads {model} cp={cp} tp={tp} sp={sp} ") == 4, worker_output


# ------------------------------------------------------------------------------------------------ worker


def _positions(rank: int, cp: int, seq: int) -> list[int]:
    chunk = seq // (2 * cp)
    return list(range(rank * chunk, (rank + 1) * chunk)) + list(
        range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    )


def _build(overrides: list[str]):
    from betterai_megatron.config import load_config
    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import initialize_parallel

    config = load_config(TINY_CONFIG, ["model.preset=tiny", "model.num_layers=4", *overrides])
    initialize_parallel(config.parallel, seed=config.train.seed)
    (chunk,), transformer_config = build_model_chunks(
        model=config.model, parallel=config.parallel, seq_length=SEQ_LENGTH, seed=config.train.seed
    )
    return chunk, transformer_config


def _data():
    import torch

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 512, (MICRO_BATCH, SEQ_LENGTH), generator=gen)
    labels = torch.randint(0, 512, (MICRO_BATCH, SEQ_LENGTH), generator=gen)
    weights = torch.rand(MICRO_BATCH, SEQ_LENGTH, generator=gen)  # distinct per token: a misplaced token shows
    return tokens, labels, weights


def _step(chunk, index, attention_mask):
    """Backward of sum(weight * CE) / sum(weight over the whole sequence) for the tokens at ``index``."""
    import torch

    tokens, labels, weights = _data()
    positions = torch.arange(SEQ_LENGTH).expand(MICRO_BATCH, -1)
    pick = lambda t: t.index_select(1, index)
    per_token = chunk(pick(tokens), pick(positions), attention_mask, labels=pick(labels))  # [b, s_local]
    loss = (per_token.float() * pick(weights)).sum() / weights.sum()
    loss.backward()


def _reference(overrides):
    import torch
    from megatron.core import parallel_state

    chunk, _ = _build(overrides)
    causal = torch.triu(torch.ones(SEQ_LENGTH, SEQ_LENGTH, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    _step(chunk, torch.arange(SEQ_LENGTH), causal)
    grads = {name: p.grad.detach().clone() for name, p in chunk.named_parameters()}
    parallel_state.destroy_model_parallel()
    return grads


def _compare(model, overrides, reference, *, cp, tp, sp):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from betterai_megatron.model.layout_invariant_init import _shard_ranges

    chunk, transformer_config = _build([*overrides, f"parallel.cp={cp}", f"parallel.tp={tp}",
                                        f"parallel.sequence_parallel={str(sp).lower()}"])
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = dist.get_rank(cp_group)
    _step(chunk, torch.tensor(_positions(cp_rank, cp, SEQ_LENGTH)), None)
    errors = {}
    for name, param in chunk.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=cp_group)  # each CP rank holds its tokens' share of the gradient
        qk_norm = "q_layernorm" in name or "k_layernorm" in name
        if tp > 1 and (qk_norm or (sp and getattr(param, "sequence_parallel", False))):
            # replicated over TP but applied to this rank's heads (QK norms) or this rank's slice of the sequence
            # (sequence parallelism): finalize_model_grads sums them over TP
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        ranges, dim, _ = _shard_ranges(param, name, gated_fc1=transformer_config.gated_linear_unit)
        expected = torch.cat([reference[name].narrow(dim, first, count) for first, count in ranges], dim=dim)
        errors[name] = ((grad - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    worst = max(errors, key=errors.get)
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    rank = dist.get_rank()
    assert not bad, f"rank {rank} {model} cp={cp} tp={tp} sp={sp}: gradients off by more than {RTOL}: {bad}"
    print(f"OK grads {model} cp={cp} tp={tp} sp={sp} rank={rank} params={len(errors)} "
          f"worst={worst}:{errors[worst]:.1e}", flush=True)
    parallel_state.destroy_model_parallel()


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for model, overrides in MODELS.items():
        reference = _reference(overrides)
        for cp, tp, sp in LAYOUTS:
            _compare(model, overrides, reference, cp=cp, tp=tp, sp=sp)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
