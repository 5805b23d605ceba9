"""Batched autoregressive generation on a megatron-core ``GPTModel``: the decoding loop.

Owns: batching of prompts, the step loop, prompt forcing for ragged batches, finishing rows (EOD, stop strings,
token budget) and dropping them, the tensor-parallel agreement on sampled tokens, and the choice between
KV-cached decoding and full recomputation (the reference). Token selection math is in ``sampling.py``, stop
strings in ``stopping.py``, the cache and recurrent states in ``context.py``, data parallelism in
``data_parallel.py``.

How a batch is decoded (megatron-core's static engine does the same; no padding token ever enters a KV cache
or a recurrent state):

1. prefill: the first ``min(prompt lengths)`` tokens of every row go through the model at once; the cache
   (``GenerationContext``, megatron's ``StaticInferenceContext``) now holds positions ``[0, min_len)``;
2. every later step feeds one token per row at the same position ``p`` and gets the logits for ``p + 1``.
   A row whose prompt is longer than ``p + 1`` is *forced*: its next token is its own prompt token, nothing is
   sampled and no generator is advanced, so a row's output does not depend on the other rows of its batch;
3. a row finishes on the end-of-document token, a stop string, or ``max_new_tokens``; it is then removed from
   the batch, from the KV cache and from every recurrent state (``GenerationContext.keep_rows``).

Prefix sharing (``GenerationConfig.share_prompt_prefixes``, with the cache): rows that agree on every token fed
so far share one *cache row* (prompts are ordered so that equal prompts and common prefixes share a batch). When
their next inputs differ -- prompts that diverge, or samples that differ -- the cache row is forked
(``GenerationContext.fork_rows`` with repeated indices) into one row per distinct input, so e.g. the
``samples_per_prompt`` copies of a GRPO prompt, or the continuations of one tree-rollout prefix, prefill their
shared part once. Each row still samples with its own generator from the logits of its cache row, so tokens and
log-probs are those of unshared decoding; ``GenerationResult.prompt_tokens_computed`` counts what was computed.

With ``use_kv_cache=False`` the same loop recomputes the whole prefix ``[0, p]`` at every step without an
inference context: the O(n^2) reference that tests compare the cache against.

Parallelism: tp > 1 works (megatron gathers the vocab-parallel logits with ``runtime_gather_output=True``; the
first rank of the tensor-parallel group broadcasts the chosen tokens so all ranks follow the same path); all
ranks of a tensor-parallel group must call ``generate`` with the same prompts. Data parallelism is a wrapper
(``data_parallel.py``). pp > 1, cp > 1 and ep > 1 are refused with a message (see ``_check_layout``).
Sequence parallelism is switched off for the duration of generation (outside MoE layers), as megatron does:
one-token decode steps cannot be split along the sequence.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from .config import GenerationConfig, SamplingParams
from .context import GenerationContext, softmax_attention_layer_numbers
from .outputs import GenerationResult, GenerationStats
from .sampling import mask_padded_vocab, row_generators, select_tokens, token_log_probs
from .stopping import StopStringMatcher


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (megatron's ``MegatronTokenizer`` has these names)."""

    eod: int
    vocab_size: int

    def detokenize(self, token_ids: list[int]) -> str: ...


def _unwrap(model):
    """The bare GPTModel under DDP / Float16Module wrappers (and a one-chunk list)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class GenerationEngine:
    """Generates continuations of token prompts with ``model`` (a megatron-core GPTModel, possibly wrapped).

    ``vocab_size``: ids >= this are never sampled (the output layer's padding rows); defaults to
    ``tokenizer.vocab_size``. Log-probs are still normalised over the full output vocabulary (see
    :func:`sampling.token_log_probs`).
    """

    def __init__(self, model, *, tokenizer: Tokenizer, config: GenerationConfig | None = None, vocab_size: int | None = None):
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise NotImplementedError(
                    f"generation got {len(model)} model chunks (virtual pipeline parallelism); load the model "
                    "with pipeline_model_parallel_size=1 for generation"
                )
            model = model[0]
        self.model = model
        self.module = _unwrap(model)
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig()
        self.vocab_size = int(vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", self.module.vocab_size))
        pg_collection = getattr(self.module, "pg_collection", None)
        self._tp_group = getattr(pg_collection, "tp", None)
        self._tp_size = _group_size(self._tp_group)
        self._tp_src = dist.get_global_rank(self._tp_group, 0) if self._tp_size > 1 else 0
        self._check_layout(pg_collection)
        self._kv_layers = softmax_attention_layer_numbers(self.module)
        self.last_stats = GenerationStats()

    def _check_layout(self, pg_collection) -> None:
        cfg = self.module.config
        pp_size = max(int(getattr(cfg, "pipeline_model_parallel_size", 1) or 1), _group_size(getattr(pg_collection, "pp", None)))
        if pp_size > 1:
            raise NotImplementedError(
                f"generation does not support pipeline parallelism (pipeline_model_parallel_size={pp_size}): "
                "load the checkpoint with pipeline_model_parallel_size=1 for generation (dist_checkpointing "
                "reshards on load); use tensor parallelism to split a model that does not fit one device"
            )
        if int(getattr(cfg, "context_parallel_size", 1) or 1) > 1:
            raise NotImplementedError("generation does not support context parallelism: set context_parallel_size=1")
        if int(getattr(cfg, "expert_model_parallel_size", 1) or 1) > 1:
            raise NotImplementedError(
                "generation does not support expert parallelism: every expert-parallel rank would have to join "
                "every forward of the others' batches; set expert_model_parallel_size=1 for generation"
            )

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None, *,
                 prompt_indices: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generate for each prompt (lists of token ids); results in the order of ``prompts``.

        ``prompt_indices`` (default ``0..n-1``) name the prompts globally: they key the per-row random
        generators, so the same (seed, index) gives the same sample whatever the batching or dp layout. For
        several samples per prompt (GRPO groups, pass@k), repeat the prompt: each copy has its own index, hence
        its own random stream, and the copies share a batch of equal lengths (no forced steps).
        """
        sampling = sampling or self.config.sampling
        prompts = [list(map(int, p)) for p in prompts]
        indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt_indices")
        self._validate_prompts(prompts, indices, sampling)
        # Group prompts of similar length: fewer forced steps per batch. Results do not depend on the grouping.
        # Equal prompts / common prefixes end up next to each other (one batch), where their prefix is shared.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))
        results: list[GenerationResult | None] = [None] * len(prompts)
        self.last_stats = GenerationStats()
        start, cpu_start = time.perf_counter(), time.process_time()
        with self._inference_model():
            for first in range(0, len(order), self.config.max_batch_size):
                batch = order[first : first + self.config.max_batch_size]
                batch_results = self._generate_batch([prompts[i] for i in batch], [indices[i] for i in batch], sampling)
                for i, result in zip(batch, batch_results):
                    results[i] = result
        self.last_stats.total_seconds = time.perf_counter() - start
        self.last_stats.total_cpu_seconds = time.process_time() - cpu_start
        self.last_stats.generated_tokens = sum(len(r.tokens) for r in results)
        return results

    def _validate_prompts(self, prompts: list[list[int]], indices: list[int], sampling: SamplingParams) -> None:
        max_positions = int(getattr(self.module, "max_sequence_length", 0) or 0)
        output_vocab = int(self.module.vocab_size)
        for prompt, index in zip(prompts, indices):
            if not prompt:
                raise ValueError(f"prompt {index} is empty: a prompt needs at least one token (e.g. BOS)")
            if min(prompt) < 0 or max(prompt) >= output_vocab:
                bad = next(t for t in prompt if t < 0 or t >= output_vocab)
                raise ValueError(f"prompt {index} has token id {bad} outside the model's vocabulary [0, {output_vocab})")
            if max_positions and len(prompt) + sampling.max_new_tokens > max_positions:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={sampling.max_new_tokens} it "
                    f"needs {len(prompt) + sampling.max_new_tokens} positions, more than the model's "
                    f"max_sequence_length={max_positions}"
                )

    @contextlib.contextmanager
    def _inference_model(self):
        """eval mode, no autograd, and sequence parallelism off (except in MoE layers) for the duration."""
        was_training = self.module.training
        self.module.eval()
        try:
            with sequence_parallel_off(self.module, enabled=self._tp_size > 1), torch.inference_mode():
                yield
        finally:
            self.module.train(was_training)

    # ------------------------------------------------------------------ one batch
    def _generate_batch(self, prompts: list[list[int]], indices: list[int], sampling: SamplingParams) -> list[GenerationResult]:
        device = next(self.module.parameters()).device
        batch_size = len(prompts)
        lengths = [len(p) for p in prompts]
        total_length = max(lengths) + sampling.max_new_tokens
        tokens = torch.zeros(batch_size, total_length, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        lengths_t = torch.tensor(lengths, device=device)
        context = None
        if self.config.use_kv_cache:
            context = GenerationContext(max_batch_size=batch_size, max_sequence_length=total_length, kv_layer_numbers=self._kv_layers)
        rows = _RowState(prompts, indices, sampling, self.tokenizer)
        # members[c]: the batch rows that cache row c stands for (they agree on every token fed so far).
        share = context is not None and self.config.share_prompt_prefixes
        members = [list(range(batch_size))] if share else [[row] for row in range(batch_size)]
        position = min(lengths)  # the position whose token the next forward predicts
        new_from = 0  # first position not yet in the cache
        while True:
            step_start, step_cpu_start = time.perf_counter(), time.process_time()
            if share:
                members = self._fork_diverging_rows(members, tokens, new_from, position, context)
            logical = torch.tensor([row for m in members for row in m], device=device)
            cache_row = torch.tensor([c for c, m in enumerate(members) for _ in m], device=device)
            representatives = torch.tensor([m[0] for m in members], device=device)
            logits = self._next_token_logits(tokens, representatives, new_from, position, context)
            rows.count_prompt_tokens(members, new_from=new_from if context is not None else 0, position=position)
            sampling_mask = (lengths_t[logical] <= position) & ~rows.done_mask(logical)
            sampled_rows = logical[sampling_mask]
            chosen, log_probs = self._choose(logits[cache_row[sampling_mask]], sampled_rows.tolist(), rows, sampling)
            tokens[sampled_rows, position] = chosen
            rows.record(sampled_rows.tolist(), chosen.tolist(), log_probs.tolist())
            self._record_step(position, len(members), time.perf_counter() - step_start,
                              time.process_time() - step_cpu_start)
            live = [[row for row in m if not rows.is_done(row)] for m in members]
            if not any(live):
                break
            if self.config.drop_finished_rows:
                keep = [c for c, m in enumerate(live) if m]
                if context is not None and len(keep) < len(members):
                    context.keep_rows(torch.tensor(keep, dtype=torch.long))
                members = [live[c] for c in keep]
            new_from = position
            position += 1
            live_rows = torch.tensor([row for m in live for row in m], device=device)
            if context is not None and bool((lengths_t[live_rows] <= position).all()):
                context.enable_decode_mode()  # every live row is past its prompt (megatron's decode phase)
        self.last_stats.prompt_tokens_computed += sum(rows.prompt_tokens_computed)
        return rows.results()

    @staticmethod
    def _fork_diverging_rows(members: list[list[int]], tokens: torch.Tensor, new_from: int, position: int,
                             context: GenerationContext) -> list[list[int]]:
        """Split every cache row whose member rows are about to be fed different tokens ``[new_from, position)``:
        the cache row is forked (``context.fork_rows``) once per distinct input, so the prefix they shared stays
        computed once. Returns the new members, in the new cache order."""
        if all(len(m) == 1 for m in members):
            return members
        inputs = tokens[:, new_from:position]
        new_members, sources = [], []
        for cache_row, rows in enumerate(members):
            by_input: dict[tuple[int, ...], list[int]] = {}
            for row in rows:
                by_input.setdefault(tuple(inputs[row].tolist()), []).append(row)
            new_members.extend(by_input.values())
            sources.extend([cache_row] * len(by_input))
        if len(new_members) != len(members):
            context.fork_rows(torch.tensor(sources, dtype=torch.long))
        return new_members

    def _next_token_logits(self, tokens: torch.Tensor, active: torch.Tensor, new_from: int, position: int,
                           context: GenerationContext | None) -> torch.Tensor:
        """Logits predicting ``position`` for rows ``active`` of ``tokens`` (``[b, total]``): ``[n, v]`` float32.

        Cached: only positions ``[new_from, position)`` go through the model, the rest is in ``context``.
        Uncached: the whole prefix ``[0, position)`` is recomputed.
        """
        if context is None:
            new_from = 0
        else:
            context.sequence_len_offset = new_from
        inputs = tokens[active, new_from:position]
        positions = torch.arange(new_from, position, device=tokens.device).unsqueeze(0).expand_as(inputs)
        logits = self.model(inputs, positions, None, inference_context=context, runtime_gather_output=True)
        if context is not None:
            context.increment_sequence_len_offset(inputs.size(1))
        return logits[:, -1, :].float()  # [n, s, v] -> [n, v]

    def _choose(self, logits: torch.Tensor, rows: list[int], state: _RowState, sampling: SamplingParams):
        """Tokens ``[m]`` and their log-probs ``[m]`` for the ``m`` rows that sample this step."""
        if not rows:
            empty = torch.empty(0, device=logits.device)
            return empty.long(), empty
        if not bool(torch.isfinite(logits[:, : self.vocab_size]).all()):
            raise RuntimeError(f"the model produced non-finite logits (NaN/inf) for prompts "
                               f"{[state.indices[r] for r in rows]}; the checkpoint or its dtype is broken")
        selectable = mask_padded_vocab(logits, self.vocab_size)
        chosen = select_tokens(selectable, temperature=sampling.temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, generators=[state.generators[r] for r in rows])
        log_probs = token_log_probs(logits, chosen)
        if self._tp_size > 1:
            # One decision for the whole tensor-parallel group, even if logits differ in the last bit.
            packed = torch.stack([chosen.double(), log_probs.double()])
            dist.broadcast(packed, src=self._tp_src, group=self._tp_group)
            chosen, log_probs = packed[0].long(), packed[1].float()
        return chosen, log_probs

    def _record_step(self, position: int, batch_size: int, seconds: float, cpu_seconds: float) -> None:
        self.last_stats.step_positions.append(position)
        self.last_stats.step_batch_sizes.append(batch_size)
        self.last_stats.step_seconds.append(seconds)
        self.last_stats.step_cpu_seconds.append(cpu_seconds)


_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_off(module: torch.nn.Module, *, enabled: bool = True):
    """Turn sequence parallelism off outside MoE layers, and restore every attribute's exact value afterwards.

    A decode step has one token per row, which cannot be split along the sequence over tp ranks. megatron's
    static engine does the same switch (``set_model_to_sequence_parallel``), but it restores by setting every
    attribute to True, which would corrupt a model that goes back to training (GRPO alternates both).
    MoE layers keep sequence parallelism: they all-gather the (replicated) tokens over tp and reduce-scatter
    back, which returns each rank the full result (megatron's static engine relies on the same).
    """
    config = getattr(module, "config", None)
    if not enabled or not getattr(config, "sequence_parallel", False):
        yield
        return
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    saved = [(config, "sequence_parallel", True)]
    pending = [module]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseMoELayer):
            continue
        saved.extend((current, name, getattr(current, name)) for name in _SEQUENCE_PARALLEL_ATTRS if hasattr(current, name))
        pending.extend(current.children())
    for owner, name, _ in saved:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


class _RowState:
    """Per-row bookkeeping of one batch: generated tokens, log-probs, generators, stop matching, finishing."""

    def __init__(self, prompts: list[list[int]], indices: list[int], sampling: SamplingParams, tokenizer: Tokenizer):
        self.prompts = prompts
        self.indices = indices
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.generators = row_generators(sampling.seed, indices)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.log_probs: list[list[float]] = [[] for _ in prompts]
        self.finished: list[GenerationResult | None] = [None] * len(prompts)
        self.matchers = [StopStringMatcher(sampling.stop_strings, tokenizer.detokenize) for _ in prompts]
        self._done = torch.zeros(len(prompts), dtype=torch.bool)
        self.prompt_tokens_computed = [0] * len(prompts)

    def is_done(self, row: int) -> bool:
        return self.finished[row] is not None

    def count_prompt_tokens(self, members: list[list[int]], *, new_from: int, position: int) -> None:
        """Charge the prompt tokens a step fed through the model: per cache row, the positions of
        ``[new_from, position)`` that are a prompt token of one of its rows, charged to its first row."""
        for rows in members:
            prompt_end = max(len(self.prompts[row]) for row in rows)
            self.prompt_tokens_computed[rows[0]] += max(0, min(position, prompt_end) - new_from)

    def done_mask(self, rows: torch.Tensor) -> torch.Tensor:
        return self._done.to(rows.device)[rows]

    def record(self, rows: list[int], chosen: list[int], log_probs: list[float]) -> None:
        eod = getattr(self.tokenizer, "eod", None)
        for row, token, log_prob in zip(rows, chosen, log_probs):
            self.tokens[row].append(token)
            self.log_probs[row].append(log_prob)
            if self.sampling.stop_at_eod and token == eod:
                self._finish(row, self.tokenizer.detokenize(self.tokens[row][:-1]), "eod")
                continue
            hit = self.matchers[row].check(self.tokens[row])
            if hit is not None:
                self._finish(row, hit[0], "stop", hit[1])
            elif len(self.tokens[row]) >= self.sampling.max_new_tokens:
                self._finish(row, self.tokenizer.detokenize(self.tokens[row]), "length")

    def _finish(self, row: int, text: str, reason: str, stop: str | None = None) -> None:
        self.finished[row] = GenerationResult(
            prompt_index=self.indices[row], prompt_tokens=self.prompts[row], tokens=self.tokens[row],
            log_probs=self.log_probs[row], text=text, finish_reason=reason, stop_string=stop,
        )
        self._done[row] = True

    def results(self) -> list[GenerationResult]:
        assert all(r is not None for r in self.finished)
        for result, computed in zip(self.finished, self.prompt_tokens_computed):
            result.prompt_tokens_computed = computed  # final: a row may be charged after it finished
        return list(self.finished)
