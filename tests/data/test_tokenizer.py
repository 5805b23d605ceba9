"""The tokenizer wrapper and tokenizer training, against sentencepiece / transformers called directly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from betterai_megatron.data.tokenizer import build_tokenizer, safe_boundary_pattern
from betterai_megatron.data.tokenizer_training import (
    TokenizerTrainingConfig,
    chunk_document,
    train_tokenizer,
)

try:
    import test_preprocess_support as support
except ImportError:  # run from the repository root as a package
    from tests.data import test_preprocess_support as support

code_model = support.code_model

SAMPLES = [
    "def f(x):\n    if x:\n        return  1\n\n\tpass\n",
    "",
    "x",
    "   leading and trailing spaces   ",
    "unicode: λ → ü 🙂 中文\n",
    "class A:\n    \"\"\"doc\"\"\"\n    def m(self):  # comment\n        return [i for i in range(10)]\n",
    "\n\n\n# only newlines and a comment\n",
    "<|im_start|>user\nwrite code<|im_end|>\n<think>hmm</think>",
]


def test_tokenize_equals_sentencepiece_and_round_trips(code_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", code_model)
    sp = spm.SentencePieceProcessor(model_file=code_model)
    for text in SAMPLES:
        assert tokenizer.tokenize(text) == sp.encode_as_ids(text)
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text  # whitespace, newlines, bytes preserved
    assert tokenizer.vocab_size == sp.get_piece_size() == support.SMALL_VOCAB


def test_tokenize_batch_equals_whole_document_encoding(code_model, tmp_path):
    tokenizer = build_tokenizer("SentencePieceTokenizer", code_model)
    assert tokenizer._boundary is not None  # the chunked path is active for this model
    sp = spm.SentencePieceProcessor(model_file=code_model)
    texts = support.stdlib_texts(tmp_path, max_files=60)
    texts.append("\n".join(texts))  # one long document: cut into many chunks
    texts.extend(SAMPLES)
    batch = tokenizer.tokenize_batch(texts, num_threads=2)
    assert len(batch) == len(texts)
    for text, ids in zip(texts, batch):
        assert ids.dtype == np.int32
        assert ids.tolist() == sp.encode_as_ids(text)


def test_safe_boundaries_exclude_characters_that_follow_a_newline_in_a_piece():
    model = io.BytesIO()
    text = ["x = 1\n#comment\ny = 2\n" * 50, "def f():\n    return 1\n" * 50]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 4), model_writer=model, vocab_size=50, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["\n#"], minloglevel=2)
    pattern = safe_boundary_pattern(model.getvalue())
    assert pattern is not None
    assert pattern.search("a\n#b") is None  # "\n#" is a piece: never cut there
    assert pattern.search("a\n\nb").start() == 2  # cut between the second newline and "b", not inside "\n\n"


def test_safe_boundaries_disabled_for_unigram_and_dummy_prefix_models():
    for options in ({"model_type": "unigram"}, {"model_type": "bpe", "add_dummy_prefix": True}):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f():\n    return 1\n"] * 200),
                                       model_writer=model, vocab_size=30, hard_vocab_limit=False,
                                       minloglevel=2, **options)
        assert safe_boundary_pattern(model.getvalue()) is None


def test_special_tokens_and_ids(code_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", code_model)
    sp = spm.SentencePieceProcessor(model_file=code_model)
    for piece in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|fim_prefix|>", "<|fim_middle|>",
                  "<|fim_suffix|>"):
        assert tokenizer.special_token_id(piece) == sp.piece_to_id(piece) != sp.unk_id()
    assert tokenizer.special_token_id("fim_prefix") == sp.piece_to_id("<|fim_prefix|>")
    # user-defined symbols: a rendered chat template encodes to the special ids
    ids = tokenizer.tokenize("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.special_token_id("<|im_start|>") and ids[-1] == tokenizer.special_token_id("im_end")
    with pytest.raises(KeyError, match="<nope>"):
        tokenizer.special_token_id("<nope>")
    assert (tokenizer.eod, tokenizer.eos, tokenizer.bos, tokenizer.pad) == (2, 2, 1, 3)
    assert sp.id_to_piece(tokenizer.eod) == "</s>"


def test_training_is_deterministic_and_code_friendly(tmp_path):
    texts = support.stdlib_texts(tmp_path, max_files=15)
    config = TokenizerTrainingConfig(vocab_size=400, num_threads=2, seed=7)
    first = train_tokenizer(texts, str(tmp_path / "a"), config=config)
    second = train_tokenizer(texts, str(tmp_path / "b"), config=config)
    assert Path(first).read_bytes() == Path(second).read_bytes()
    sp = spm.SentencePieceProcessor(model_file=first)
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert any("\n" in p for p in pieces)  # newlines are real pieces, not byte fallback
    assert "▁▁▁▁" in pieces  # indentation runs
    assert not sp.encode_as_pieces("import os")[0].startswith("▁")  # no dummy prefix
    assert sp.encode_as_ids("😀") == [sp.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]  # byte fallback


def test_chunk_document_keeps_every_character():
    text = "a" * 50 + "\n" + "b\n" * 30 + "é" * 40
    chunks = list(chunk_document(text, max_bytes=32))
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 32 for c in chunks)


def test_unknown_tokenizer_type_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="GPT2BPETokenizer"):
        build_tokenizer("GPT2BPETokenizer", "x")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))


def test_huggingface_tokenizer_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    support.hf_tokenizer_dir(tmp_path / "hf", ["def f(x):\n    return x + 1\n"] * 50 + SAMPLES)
    ours = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for text in SAMPLES:
        assert ours.tokenize(text) == reference(text).input_ids
    assert [a.tolist() for a in ours.tokenize_batch(SAMPLES)] == [reference(t).input_ids for t in SAMPLES]
    assert ours.eod == reference.convert_tokens_to_ids("</s>")
    assert ours.vocab_size == len(reference)
    assert ours.special_token_id("fim_prefix") == reference.convert_tokens_to_ids("<fim_prefix>")
    assert ours.pad == -1  # no pad token: megatron-core's "no pad" value
    json.dumps(ours.unique_identifiers)  # megatron-core hashes this into its cache key
