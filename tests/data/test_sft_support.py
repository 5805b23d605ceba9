"""Test tokenizers for the chat-template, SFT and preference tests (no tests here).

* :func:`sp_tokenizer` — a fixture: a tiny sentencepiece BPE model trained in the test session with the chat and
  reasoning special tokens as ``user_defined_symbols``, wrapped in the project tokenizer interface
  (``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``pad``, ``bos``, ``special_token_id``), so these tests do
  not depend on ``betterai_megatron.data.tokenizer``.
* :class:`CharTokenizer` — one token per character, so token counts and positions can be computed by hand.
"""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


class SentencePieceTestTokenizer:
    """The project tokenizer interface over a sentencepiece model (pad=0, unk=1, bos=2, eos/eod=3)."""

    def __init__(self, model_proto: bytes) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.pad, self.bos, self.eod = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def special_token_id(self, name: str) -> int:
        token_id = self.sp.piece_to_id(name)
        if token_id == self.sp.unk_id():
            raise KeyError(name)
        return token_id


class CharTokenizer:
    """One id per character (``6 + ord(c)``); ids 0/1 are pad/eod, 2..5 the special tokens."""

    vocab_size = 6 + 0x3000
    pad, eod, bos = 0, 1, 1

    def __init__(self, specials=tuple(SPECIAL_TOKENS)) -> None:
        self.specials = {name: 2 + i for i, name in enumerate(specials)}

    def tokenize(self, text: str) -> list[int]:
        return [6 + ord(c) for c in text]

    def detokenize(self, ids) -> str:
        names = {v: k for k, v in self.specials.items()}
        return "".join(names.get(int(i), chr(int(i) - 6) if int(i) >= 6 else "") for i in ids)

    def special_token_id(self, name: str) -> int:
        return self.specials[name]


def _training_text() -> list[str]:
    rng = random.Random(0)
    words = ("def return class import for while if else print self value list dict the a of to and in is code "
             "function data write sort numbers python test answer think step first then result").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(300)]
    lines += ["def add(a, b):\n    return a + b\n", "user\n", "assistant\n", "system\n", "```python\n```"]
    return lines


@pytest.fixture(scope="session")
def sp_tokenizer() -> SentencePieceTestTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=model, vocab_size=420, model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    return SentencePieceTestTokenizer(model.getvalue())
