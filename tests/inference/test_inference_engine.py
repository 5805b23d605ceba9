"""The decoding loop on real tiny megatron-core GPTModels: softmax-only (``AA``) and hybrid (``GADL``: Gated
DeltaNet, softmax attention, DeltaNet and GLA layers from ``betterai_megatron.model.linear_attention``).

References: the engine's full-recompute mode (no inference context), a plain model forward over the finished
sequence (for log-probs), each prompt generated alone in a batch of one (for ragged batches: no forced prompt
steps, no neighbours), and str.find on the unstopped text (for stop strings; the character tokenizer makes one
token one character).
"""

from __future__ import annotations

import pytest
import torch

from betterai_megatron.inference.config import GenerationConfig, SamplingParams
from betterai_megatron.inference.engine import GenerationEngine

PROMPTS = ["def add(a, b):", "import os\n", "x", "class Stack:", "# squares\n"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, stop_at_eod=False)
SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=24, seed=11)


def make_engine(model, tokenizer, **config) -> GenerationEngine:
    return GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(**config))


def encode(tokenizer, texts=PROMPTS):
    return [tokenizer.tokenize(t) for t in texts]


def assert_same_results(actual, expected, *, log_prob_tol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.tokens == e.tokens, f"prompt {e.prompt_index}: tokens differ"
        assert a.log_probs == pytest.approx(e.log_probs, abs=log_prob_tol)
        assert (a.text, a.finish_reason, a.stop_string) == (e.text, e.finish_reason, e.stop_string)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_cached_equals_uncached(model, tokenizer, sampling):
    prompts = encode(tokenizer)
    cached = make_engine(model, tokenizer).generate(prompts, sampling)
    uncached = make_engine(model, tokenizer, use_kv_cache=False).generate(prompts, sampling)
    assert_same_results(cached, uncached)
    assert all(len(r.tokens) == 24 for r in cached if r.finish_reason == "length")


def test_log_probs_are_the_models_next_token_log_probs(model, tokenizer):
    """log_probs[i] == log_softmax(raw logits)[token i], from one plain forward over prompt + generation."""
    prompts = encode(tokenizer)
    sampling = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=16, seed=3)
    results = make_engine(model, tokenizer).generate(prompts, sampling)
    model.eval()
    with torch.no_grad():
        for result in results:
            sequence = torch.tensor([result.prompt_tokens + result.tokens])
            positions = torch.arange(sequence.size(1)).unsqueeze(0)
            logits = model(sequence, positions, None)[0].float()  # [s, v]
            start = len(result.prompt_tokens) - 1
            log_probs = torch.log_softmax(logits[start : start + len(result.tokens)], dim=-1)
            expected = log_probs.gather(-1, torch.tensor(result.tokens).unsqueeze(-1)).squeeze(-1)
            assert result.log_probs == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_ragged_batch_equals_each_prompt_alone(model, tokenizer, sampling):
    prompts = encode(tokenizer)
    batched = make_engine(model, tokenizer).generate(prompts, sampling)
    alone_engine = make_engine(model, tokenizer)
    alone = [alone_engine.generate([p], sampling, prompt_indices=[i])[0] for i, p in enumerate(prompts)]
    assert_same_results(batched, alone)


_UNSTOPPED_CACHE: dict = {}


def _unstopped(model, tokenizer, prompts, sampling):
    """Reference generation: each prompt alone, no stop strings, no EOD stop (memoised per model)."""
    plain = sampling.replace(stop_strings=[], stop_at_eod=False)
    key = (id(model), repr(plain), repr(prompts))
    if key not in _UNSTOPPED_CACHE:
        engine = make_engine(model, tokenizer)
        _UNSTOPPED_CACHE[key] = [engine.generate([p], plain, prompt_indices=[i])[0] for i, p in enumerate(prompts)]
    return _UNSTOPPED_CACHE[key]


def test_stop_strings_end_rows_at_different_steps(model, tokenizer):
    prompts = encode(tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=30, stop_at_eod=False, seed=5)
    reference = _unstopped(model, tokenizer, prompts, sampling)
    # Stop strings taken from different places of different rows' own text, so rows stop at different steps.
    stops = [reference[0].text[6:8], reference[1].text[15:18], reference[3].text[24:26]]
    results = make_engine(model, tokenizer).generate(prompts, sampling.replace(stop_strings=stops))
    reasons = set()
    for result, ref in zip(results, reference):
        hits = [(ref.text.find(s), -len(s), s) for s in stops if ref.text.find(s) >= 0]
        if hits:
            offset, neg_len, stop = min(hits)
            assert (result.finish_reason, result.stop_string, result.text) == ("stop", stop, ref.text[:offset])
            assert result.tokens == ref.tokens[: offset - neg_len]
            assert result.log_probs == pytest.approx(ref.log_probs[: offset - neg_len], abs=1e-5)
        else:
            assert (result.finish_reason, result.tokens, result.text) == ("length", ref.tokens, ref.text)
        reasons.add((result.finish_reason, len(result.tokens)))
    assert len(reasons) >= 3, "the test should end rows at several different steps"


def test_dropping_finished_rows_computes_fewer_rows_same_results(model, tokenizer):
    prompts = encode(tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=30, stop_at_eod=False, seed=5)
    reference = _unstopped(model, tokenizer, prompts, sampling)
    stops = [reference[0].text[3:5], reference[2].text[8:10]]
    runs = {}
    for drop in (True, False):
        engine = make_engine(model, tokenizer, drop_finished_rows=drop)
        runs[drop] = (engine.generate(prompts, sampling.replace(stop_strings=stops)), engine.last_stats)
    assert_same_results(runs[True][0], runs[False][0])  # batch shapes differ: last-bit rounding only
    assert runs[True][1].computed_rows < runs[False][1].computed_rows


class _EodTokenizer:
    """The character tokenizer with another token playing end-of-document."""

    def __init__(self, base, eod: int):
        self.base, self.eod, self.vocab_size = base, eod, base.vocab_size

    def detokenize(self, ids):
        return self.base.detokenize(ids)


def test_eod_ends_row_and_is_kept_in_tokens_not_text(model, tokenizer):
    prompts = encode(tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=30, seed=5)
    reference = _unstopped(model, tokenizer, prompts, sampling)
    eod = reference[0].tokens[4]
    results = make_engine(model, _EodTokenizer(tokenizer, eod)).generate(prompts, sampling)
    for result, ref in zip(results, reference):
        if eod in ref.tokens:
            end = ref.tokens.index(eod)
            assert result.finish_reason == "eod"
            assert result.tokens == ref.tokens[: end + 1]
            assert result.text == tokenizer.detokenize(ref.tokens[:end])
        else:
            assert result.finish_reason == "length" and result.tokens == ref.tokens
    assert results[0].finish_reason == "eod" and len(results[0].tokens) <= 5


def test_same_seed_same_samples_different_seed_different_samples(softmax_model, tokenizer):
    prompts = encode(tokenizer)
    engine = make_engine(softmax_model, tokenizer)
    first = engine.generate(prompts, SAMPLED)
    torch.manual_seed(999)  # the global RNG plays no part
    again = engine.generate(prompts, SAMPLED)
    other = engine.generate(prompts, SAMPLED.replace(seed=12))
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert [r.tokens for r in first] != [r.tokens for r in other]
    # Batch size does not change a row's samples either.
    one_by_one = make_engine(softmax_model, tokenizer, max_batch_size=1).generate(prompts, SAMPLED)
    assert [r.tokens for r in first] == [r.tokens for r in one_by_one]


def test_top_k_one_equals_greedy_and_padded_vocab_is_never_sampled(softmax_model, tokenizer):
    prompts = encode(tokenizer)
    engine = make_engine(softmax_model, tokenizer)
    greedy = engine.generate(prompts, GREEDY)
    top1 = engine.generate(prompts, SAMPLED.replace(top_k=1, top_p=1.0, stop_at_eod=False))
    assert [r.tokens for r in greedy] == [r.tokens for r in top1]
    # The model's output layer has 128 rows, the tokenizer 97 ids: a hot temperature flattens the distribution.
    assert softmax_model.vocab_size > tokenizer.vocab_size
    hot = engine.generate(prompts, SAMPLED.replace(temperature=50.0, top_k=0, top_p=1.0, stop_at_eod=False))
    assert max(max(r.tokens) for r in hot) < tokenizer.vocab_size


def test_cached_decoding_feeds_one_token_per_step(softmax_model, tokenizer):
    prompts = encode(tokenizer, ["abcdef", "abc"])
    fed_lengths = []
    hook = softmax_model.embedding.register_forward_pre_hook(lambda module, args, kwargs: fed_lengths.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        # one cache row per prompt: with prefix sharing the common "abc" would be prefilled once (test_inference_fork)
        make_engine(softmax_model, tokenizer, share_prompt_prefixes=False).generate(prompts, GREEDY.replace(max_new_tokens=4))
    finally:
        hook.remove()
    # prefill of the shortest prompt (3 tokens), then single tokens; the short row ends first and is dropped.
    assert fed_lengths[0] == (2, 3)
    assert all(shape[1] == 1 for shape in fed_lengths[1:])
    assert [shape[0] for shape in fed_lengths] == [2, 2, 2, 2, 1, 1, 1]


def test_errors_name_the_prompt_and_the_limit(softmax_model, tokenizer):
    engine = make_engine(softmax_model, tokenizer)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5], []], GREEDY)
    with pytest.raises(ValueError, match="prompt 0 has token id 500"):
        engine.generate([[5, 500]], GREEDY)
    with pytest.raises(ValueError, match="prompt 0 has 1020 tokens.*max_sequence_length=1024"):
        engine.generate([[5] * 1020], GREEDY)


def test_pipeline_parallel_model_is_refused(softmax_model, tokenizer):
    config = softmax_model.config
    config.pipeline_model_parallel_size = 2
    try:
        with pytest.raises(NotImplementedError, match="pipeline parallelism"):
            make_engine(softmax_model, tokenizer)
    finally:
        config.pipeline_model_parallel_size = 1
    with pytest.raises(NotImplementedError, match="2 model chunks"):
        GenerationEngine([softmax_model, softmax_model], tokenizer=tokenizer)


def test_sequence_parallel_is_switched_off_and_restored_exactly(softmax_model):
    from betterai_megatron.inference.engine import sequence_parallel_off

    modules = [m for m in softmax_model.modules() if hasattr(m, "sequence_parallel")]
    assert len(modules) >= 4
    original = [m.sequence_parallel for m in modules]
    mixed = [i % 2 == 0 for i in range(len(modules))]  # a model where not every module is sequence parallel
    for module, value in zip(modules, mixed):
        module.sequence_parallel = value
    softmax_model.config.sequence_parallel = True
    try:
        with sequence_parallel_off(softmax_model):
            assert not softmax_model.config.sequence_parallel
            assert not any(m.sequence_parallel for m in modules)
        assert softmax_model.config.sequence_parallel
        assert [m.sequence_parallel for m in modules] == mixed
    finally:
        softmax_model.config.sequence_parallel = False
        for module, value in zip(modules, original):
            module.sequence_parallel = value


def test_non_finite_logits_fail_with_a_message(softmax_model, tokenizer):
    weight = softmax_model.output_layer.weight  # not tied to the embedding in the tiny models
    saved = weight.data[3].clone()
    weight.data[3] = float("nan")  # the logit of token 3 becomes NaN at every position
    try:
        with pytest.raises(RuntimeError, match=r"non-finite logits .* prompts \[0\]"):
            make_engine(softmax_model, tokenizer).generate([[5, 6]], GREEDY)
    finally:
        weight.data[3] = saved
