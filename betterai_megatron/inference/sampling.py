"""Token selection math: pure tensor functions, no model, no process groups.

* :func:`sampling_probabilities` -- temperature, then top-k, then top-p (nucleus, Holtzman et al. 2020,
  "The Curious Case of Neural Text Degeneration"), in the order HF transformers' logits processors apply them.
* :func:`sample_from_probabilities` -- inverse-CDF sampling with one uniform number per row, drawn from that row's
  own ``torch.Generator``. One draw per row (instead of ``torch.multinomial`` over the batch) is what makes a row's
  samples independent of which other rows share its batch, of the batch size and of the data-parallel layout.
* :func:`token_log_probs` -- log pi(token | prefix) from the *unmodified* logits (see its docstring).
* :func:`row_generators` -- the per-row generators, seeded from ``(seed, prompt index)``.

Hand-written: these are a few lines of torch each, and the libraries that have them (HF's logits processors,
megatron's ``sample_from_logits``) draw with the global RNG over the whole batch, which loses the per-row
determinism above.

Shapes: ``logits`` and probabilities are ``[b, v]`` (b rows of the active batch, v = vocabulary as the output
layer produces it, possibly padded past the tokenizer's vocabulary); tokens and log-probs are ``[b]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def row_generators(seed: int, prompt_indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row, seeded by a hash of ``(seed, prompt index)``.

    CPU generators on purpose: the same seed then gives the same draws on CPU and GPU, and only one number per
    row and step is drawn (moved to the device with the rest of the step's small tensors).
    """
    generators = []
    for index in prompt_indices:
        digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        generators.append(generator)
    return generators


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of ids >= ``vocab_size`` (the output layer's padding rows) to -inf, so they are never chosen."""
    if logits.size(-1) <= vocab_size:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


def sampling_probabilities(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from: ``[b, v]`` logits -> ``[b, v]`` float32 probabilities.

    ``softmax(logits / temperature)``, then only the ``top_k`` largest kept (``0`` = all; tokens tied with the
    k-th value are kept too), renormalised, then only the smallest prefix of tokens sorted by decreasing
    probability whose mass reaches ``top_p`` kept (the most likely token always stays), renormalised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (0 means greedy), got {temperature}")
    scaled = logits.float() / temperature
    if top_k > 0 and top_k < scaled.size(-1):
        kth_value = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_ids, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from_probabilities(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one token per row by inverse CDF: ``[b, v]`` probabilities -> ``[b]`` int64 token ids.

    Row i uses one uniform number ``u`` from ``generators[i]`` and returns the first token whose cumulative
    probability exceeds ``u * total``; a token of probability 0 is never returned.
    """
    if probs.size(0) != len(generators):
        raise ValueError(f"{probs.size(0)} rows but {len(generators)} generators")
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    cdf = torch.cumsum(probs.double(), dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # u * total can round up to total itself; fall back to the last token of non-zero probability.
    vocab_ids = torch.arange(probs.size(-1), device=probs.device)
    last_positive = torch.where(probs > 0, vocab_ids, -1).amax(dim=-1)
    return torch.minimum(tokens, last_positive)


def select_tokens(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Greedy (``temperature == 0``: argmax, first index on ties) or sampled tokens: ``[b, v]`` -> ``[b]``."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    return sample_from_probabilities(sampling_probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p), generators)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[token]`` per row, in float32: ``[b, v]``, ``[b]`` -> ``[b]``.

    ``logits`` must be the model's raw next-token logits: before temperature, top-k, top-p or the padded-vocab
    mask, over the full (padded) output vocabulary. The result is then log pi(token | prefix) of the policy at
    temperature 1 -- the same quantity megatron's cross-entropy loss computes in training -- not the log of the
    probability the token had under the sampling distribution. Computed in float32 (bf16 logits are upcast
    first); with a KV cache it matches a full recomputation to ~1e-6 in float32 models (tested to 1e-5).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
