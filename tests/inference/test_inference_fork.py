"""Forking cached rows (``GenerationContext.fork_rows``) and the engine's prompt-prefix sharing built on it.

References: the cached state before the fork (cloned), the uncached engine (``use_kv_cache=False``: recomputes the
whole prefix at every step, no context, no sharing), and prompt-token counts computed by hand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from betterai_megatron.inference.config import GenerationConfig, SamplingParams
from betterai_megatron.inference.context import (
    GenerationContext,
    softmax_attention_layer_numbers,
)
from betterai_megatron.inference.engine import GenerationEngine

PREFIX = "def add(a, b):\n"  # 15 characters = 15 tokens
CONTINUATIONS = ["  ret", "  x =", "if a:"]  # equal lengths: they run in one static context after the fork


def _prefill(model, context: GenerationContext, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed ``token_ids`` ``[b, s]`` after the cached positions; logits of the last position ``[b, v]``."""
    start = context.sequence_len_offset
    positions = torch.arange(start, start + token_ids.size(1)).unsqueeze(0).expand_as(token_ids)
    logits = model(token_ids, positions, None, inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(token_ids.size(1))
    return logits[:, -1, :].float()


def _context(model, rows: int, length: int) -> GenerationContext:
    return GenerationContext(max_batch_size=rows, max_sequence_length=length,
                             kv_layer_numbers=softmax_attention_layer_numbers(model))


@torch.inference_mode()  # as the engine runs: megatron's cache tensors are inference tensors
def test_fork_rows_copies_every_cached_state(hybrid_model, tokenizer):
    """Rows [1, 0, 1] of a 2-row state: every KV memory (filled positions) and every recurrent/conv state."""
    hybrid_model.eval()
    context = _context(hybrid_model, rows=3, length=32)
    context.batch_size = 2  # rows of the current batch (room for 3)
    prompts = torch.tensor([tokenizer.tokenize("abcdefg"), tokenizer.tokenize("xyz uvw")])
    _prefill(hybrid_model, context, prompts)
    before = {k: [t.clone() for t in v if isinstance(t, torch.Tensor)] for k, v in context.key_value_memory_dict.items()}
    assert any(k in context.kv_layer_numbers for k in before) and any(k not in context.kv_layer_numbers for k in before)
    context.fork_rows(torch.tensor([1, 0, 1]))
    assert context.batch_size == 3
    for layer, old in before.items():
        new = [t for t in context.key_value_memory_dict[layer] if isinstance(t, torch.Tensor)]
        for old_t, new_t in zip(old, new):
            if layer in context.kv_layer_numbers:
                old_t, new_t = old_t[:7], new_t[:7]  # the filled positions
            for row, source in enumerate([1, 0, 1]):
                assert torch.equal(new_t[:, row], old_t[:, source]), f"layer {layer} row {row}"


def test_fork_rows_rejects_bad_rows(softmax_model):
    context = _context(softmax_model, rows=2, length=8)
    context.batch_size = 1
    with pytest.raises(ValueError, match="max_batch_size=2"):
        context.fork_rows(torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"outside the current batch \[0, 1\)"):
        context.fork_rows(torch.tensor([1]))


@torch.inference_mode()
def test_greedy_from_forked_cache_equals_generation_from_scratch(model, tokenizer):
    """Prefill the shared prefix once (1 row), fork it into 3 rows, feed each its own continuation, decode greedily:
    token for token what the uncached engine generates from ``prefix + continuation``, log-probs within 1e-5."""
    steps = 10
    model.eval()
    context = _context(model, rows=3, length=64)
    context.batch_size = 1
    _prefill(model, context, torch.tensor([tokenizer.tokenize(PREFIX)]))
    context.fork_rows(torch.zeros(3, dtype=torch.long))
    continuations = torch.tensor([tokenizer.tokenize(c) for c in CONTINUATIONS])
    for column in range(continuations.size(1)):  # one position per forward after a prefill, as the engine does
        logits = _prefill(model, context, continuations[:, column : column + 1])
    tokens, log_probs = [[] for _ in CONTINUATIONS], [[] for _ in CONTINUATIONS]
    for _ in range(steps):
        chosen = logits[:, : tokenizer.vocab_size].argmax(-1)
        chosen_log_probs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0]
        for row in range(len(CONTINUATIONS)):
            tokens[row].append(int(chosen[row]))
            log_probs[row].append(float(chosen_log_probs[row]))
        logits = _prefill(model, context, chosen[:, None])
    reference = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(use_kv_cache=False)).generate(
        [tokenizer.tokenize(PREFIX + c) for c in CONTINUATIONS],
        SamplingParams(max_new_tokens=steps, temperature=0.0, stop_at_eod=False))
    for row, result in enumerate(reference):
        assert tokens[row] == result.tokens
        assert log_probs[row] == pytest.approx(result.log_probs, abs=1e-5)


PROMPTS = [PREFIX + "  ret", PREFIX + "  ret", PREFIX + "  x", PREFIX, "zz"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefixes_match_uncached_generation(model, tokenizer, temperature):
    """Equal prompts and common prefixes share cache rows; tokens and log-probs are those of the uncached engine."""
    sampling = SamplingParams(max_new_tokens=8, temperature=temperature, seed=7)
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]
    shared = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig()).generate(prompts, sampling)
    reference = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(use_kv_cache=False)).generate(
        prompts, sampling)
    for got, want in zip(shared, reference):
        assert got.tokens == want.tokens
        assert got.log_probs == pytest.approx(want.log_probs, abs=1e-5)


def test_prompt_tokens_computed_by_hand(softmax_model, tokenizer):
    """Unshared: every prompt token once (20 + 20 + 18 + 15 + 2 = 75). Shared: the batch prefills its shortest
    prompt length (2 tokens: "de" shared by four rows, "zz") = 4, then the prefix trie is fed one position per
    step: "f add(a, b):\\n" 13 + "  " 2 + "ret" 3 + "x" 1 = 19, in all 23."""
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    counts = {}
    for share in (False, True):
        engine = GenerationEngine(softmax_model, tokenizer=tokenizer, config=GenerationConfig(share_prompt_prefixes=share))
        results = engine.generate(prompts, sampling)
        counts[share] = sum(r.prompt_tokens_computed for r in results)
        assert engine.last_stats.prompt_tokens_computed == counts[share]
    assert counts == {False: 75, True: 23}


@pytest.mark.distributed
def test_shared_prefixes_at_tp2_match_uncached(tmp_path):
    """tp=2 (each rank forks its local heads): shared == uncached on both ranks, and 23 prompt tokens computed."""
    worker = Path(__file__).with_name("fork_tp2_worker.py")
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(worker), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    results = ranks[0]
    assert len(results) == 8
    for key in [k for k in results if k.endswith("/shared")]:
        reference = results[key.replace("/shared", "/uncached")]
        for got, want in zip(results[key], reference):
            assert got["tokens"] == want["tokens"], key
            assert got["log_probs"] == pytest.approx(want["log_probs"], abs=1e-5), key
        assert sum(r["prompt_tokens_computed"] for r in results[key]) == 23, key
