"""The tokenizer object every data component uses: sentencepiece or a local HuggingFace tokenizer.

Owns :func:`build_tokenizer` and the two wrappers behind it. Both produce exactly the token ids that
Megatron-LM's wrappers (``megatron/core/tokenizers/text/libraries``, as used by Megatron-LM's
``tools/preprocess_data.py`` with default flags) produce for the same model file:

- ``SentencePieceTokenizer``: ``tokenize(text) == sp.encode_as_ids(text)`` (Megatron's non-legacy path with
  ``ignore_extra_whitespaces=True``, its defaults); ``eod`` is the model's ``eos`` id; ``vocab_size`` is the
  piece count; ``pad``/``bos`` come from the model. Special tokens are whatever the model file says: the
  chat/reasoning/FIM tokens that ``tools/train_tokenizer.py`` adds are *user-defined symbols*, so sentencepiece
  itself encodes the literal text ``<|im_start|>`` as one id, which is what a rendered chat template needs.
- ``HuggingFaceTokenizer``: ``transformers.AutoTokenizer`` from a local directory (never the hub), with the same
  special-token completion Megatron applies (sep from eos, eos from sep, bos from cls, cls from bos);
  ``tokenize(text) == tokenizer(text).input_ids``; ``eod`` is the eos id; ``pad`` is -1 when the tokenizer
  has none (Megatron's wrapper says None, which megatron-core's dataset cannot compare against).

Interface (the contract other components code against): ``tokenize(text) -> list[int]``,
``tokenize_batch(texts) -> list[numpy int32 array]`` (same ids, many documents per call, multithreaded; for
sentencepiece BPE models long documents are cut at provably safe newline boundaries first, see
:func:`safe_boundary_pattern`, which saves ~40% of the encoding time),
``detokenize(ids) -> str``, ``vocab_size``, ``eod``, ``eos``, ``pad``, ``bos`` (None when the model has none),
``special_token_id(name)``, ``unique_identifiers``. That is what megatron-core's ``GPTDataset`` /
``BlendedMegatronDatasetBuilder`` read (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``).

Why not a subclass of ``megatron.core.tokenizers.MegatronTokenizerBase``: importing it runs
``megatron/core/__init__.py`` (torch plus all of megatron-core, ~9 s on a 2-core box), which every
preprocessing worker would pay; megatron-core only duck-types its tokenizer (no isinstance checks in 0.16.1).
When megatron-core is already imported, :func:`build_tokenizer` registers our classes as virtual subclasses of
that base, so ``isinstance(tok, MegatronTokenizerBase)`` holds in training processes at no cost.

Not supported (clear errors): Megatron's ``--tokenizer-sentencepiece-legacy`` mode with extra special tokens
added outside the model file, and ``ignore_extra_whitespaces=False`` for models trained to drop extra spaces.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Short names for the tokens the chat template, reasoning traces and fill-in-the-middle need.
# tools/train_tokenizer.py puts the first spelling of each into the model; HuggingFace models use
# one of the alternatives (StarCoder: "<fim_prefix>", CodeLlama: "<PRE>").
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "im_start": ("<|im_start|>",),
    "im_end": ("<|im_end|>",),
    "think_start": ("<think>",),
    "think_end": ("</think>",),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>", "<PRE>", "▁<PRE>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>", "<MID>", "▁<MID>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>", "<SUF>", "▁<SUF>"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>"),
    "endoftext": ("<|endoftext|>",),
}

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer")


def special_token_spellings(name: str) -> tuple[str, ...]:
    """Candidate spellings for ``name`` (a short name such as ``"fim_prefix"`` or a literal ``"<think>"``)."""
    if name in SPECIAL_TOKENS:
        return SPECIAL_TOKENS[name]
    for spellings in SPECIAL_TOKENS.values():
        if name in spellings:
            return (name,) + tuple(s for s in spellings if s != name)
    return (name,)


def _register_with_megatron(cls: type) -> None:
    """Make ``isinstance(tok, MegatronTokenizerBase)`` true when megatron-core is already loaded (free then)."""
    module = sys.modules.get("megatron.core.tokenizers.base_tokenizer")
    base = getattr(module, "MegatronTokenizerBase", None)
    if base is not None and not issubclass(cls, base):
        base.register(cls)


_CHUNK_CHARS = 2048  # documents are cut into pieces of at least this many characters (when a boundary exists)


def safe_boundary_pattern(model_proto: bytes):
    """A regex matching newlines after which a text can be cut without changing its sentencepiece ids; or None.

    Why this is exact (for BPE): sentencepiece's BPE encoder repeatedly merges the best-scoring *adjacent* pair of
    symbols whose concatenation is a vocabulary piece. If no piece contains the two characters around a cut
    position, no merge ever crosses it, so both sides go through the same merges, in the same relative order
    (ties break by position), as they would alone. A cut after ``"\n"`` is safe when no piece contains ``"\n"``
    followed by the next character; the pattern excludes every character that some piece (user-defined symbols
    included) has right after a newline. Only for models whose normalizer is the identity without dummy prefix
    or whitespace trimming (what tools/train_tokenizer.py writes), since those rewrite text at string edges.
    Unigram models, or a model that cannot be inspected (no protobuf), get None: whole-document encoding.
    """
    import re

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: stay on the plain path
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    normalizer = proto.normalizer_spec
    if (proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or normalizer.name != "identity"
            or normalizer.precompiled_charsmap or normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces
            or proto.trainer_spec.treat_whitespace_as_suffix):
        return None
    forbidden = {"\n"}
    for piece in proto.pieces:
        text = piece.piece
        position = text.find("\n")
        while 0 <= position < len(text) - 1:
            forbidden.add(text[position + 1])
            position = text.find("\n", position + 1)
    if "\u2581" in forbidden and normalizer.escape_whitespaces:
        forbidden.add(" ")  # the normalizer writes a space as U+2581
    return re.compile("\n(?=[^" + "".join(re.escape(ch) for ch in sorted(forbidden)) + "])")


def _split_at_boundaries(texts: list[str], boundary, *, target_chars: int) -> tuple[list[str], list[int]]:
    """Cut each text at the first safe boundary past every ``target_chars``; returns chunks and chunks per text."""
    chunks: list[str] = []
    counts: list[int] = []
    for text in texts:
        if len(text) <= 2 * target_chars:
            chunks.append(text)
            counts.append(1)
            continue
        start, count = 0, 0
        while True:
            match = boundary.search(text, start + target_chars) if len(text) - start > 2 * target_chars else None
            if match is None:
                chunks.append(text[start:])
                count += 1
                break
            chunks.append(text[start:match.end()])
            count += 1
            start = match.end()
        counts.append(count)
    return chunks, counts


class SentencePieceTokenizer:
    """A sentencepiece model file; ids identical to Megatron-LM's ``SentencePieceTokenizer`` (default flags)."""

    library = "sentencepiece"

    def __init__(self, model_path: str, *, ignore_extra_whitespaces: bool = True) -> None:
        import sentencepiece

        if not model_path or not os.path.isfile(model_path):
            raise FileNotFoundError(f"--tokenizer-model {model_path!r}: no such sentencepiece model file")
        self.path = model_path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_path}: not a sentencepiece model ({error})") from error
        if not ignore_extra_whitespaces and self._sp.encode_as_pieces("x  y") == self._sp.encode_as_pieces("x y"):
            raise NotImplementedError(
                f"{model_path} drops repeated spaces; Megatron's ignore_extra_whitespaces=False workaround for "
                "such models is not supported (train code tokenizers with tools/train_tokenizer.py instead)"
            )
        self.vocab_size: int = self._sp.get_piece_size()
        self._boundary = safe_boundary_pattern(self._sp.serialized_model_proto())

    # -- encoding ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode_as_ids(text)

    def tokenize_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list:
        """Token ids of many texts at once, as int32 numpy arrays; element i equals ``tokenize(texts[i])``.

        One call into sentencepiece for the whole batch (``num_threads`` C++ threads, no per-id Python ints).
        Long documents are cut at *safe boundaries* first (see :func:`safe_boundary_pattern`) and the pieces'
        ids concatenated: identical ids, ~1.7x less CPU, because sentencepiece's BPE merge queue is slower on
        one 100 KB string than on fifty 2 KB strings.
        """
        texts = list(texts)
        if self._boundary is None:
            return self._sp.encode(texts, return_type="numpy", num_threads=num_threads)
        chunks, counts = _split_at_boundaries(texts, self._boundary, target_chars=_CHUNK_CHARS)
        encoded = self._sp.encode(chunks, return_type="numpy", num_threads=num_threads)
        if len(encoded) == len(texts):
            return encoded
        import numpy

        out, start = [], 0
        for count in counts:
            out.append(encoded[start] if count == 1 else numpy.concatenate(encoded[start:start + count]))
            start += count
        return out

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    # -- special ids -----------------------------------------------------------------------------------------
    @property
    def eod(self) -> int:
        """End-of-document id appended by ``--append-eod``: the model's eos, as in Megatron-LM."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        """Padding id; -1 when the model has none (megatron-core's own 'no pad' value)."""
        return self._sp.pad_id()

    @property
    def bos(self) -> int | None:
        bos = self._sp.bos_id()
        return None if bos < 0 else bos

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    def special_token_id(self, name: str) -> int:
        """Id of a chat/reasoning/FIM token by short name (``"fim_prefix"``) or spelling (``"<|im_start|>"``)."""
        for piece in special_token_spellings(name):
            token_id = self._sp.piece_to_id(piece)
            if token_id != self._sp.unk_id() or piece == self._sp.id_to_piece(self._sp.unk_id()):
                return token_id
        raise KeyError(f"{self.path} has no special token {name!r} (tried {special_token_spellings(name)})")

    def token_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # -- megatron-core duck typing ---------------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core hashes into its dataset cache keys."""
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("tokenizer_path", self.path)]
        )

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are rendered by the SFT dataset, not by the tokenizer")

    def __getstate__(self) -> dict:
        # Workers receive the model path, not the processor (which does not pickle); reloading is ~10 ms.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class HuggingFaceTokenizer:
    """``transformers.AutoTokenizer`` from a local directory; ids identical to Megatron-LM's wrapper."""

    library = "huggingface"

    def __init__(self, model_path: str) -> None:
        if not model_path or not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"--tokenizer-model {model_path!r}: HuggingFaceTokenizer needs a local directory with "
                "tokenizer.json / tokenizer_config.json (downloads from the hub are not done)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError("HuggingFaceTokenizer needs `transformers` (pip install transformers)") from error
        self.path = model_path
        self._hf = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        # The same completion Megatron-LM applies, so eod/bos resolve the same way and the same tokens are special.
        completion: dict[str, object] = {}
        hf = self._hf
        if hf.sep_token is None and hf.eos_token:
            completion["sep_token"] = hf.eos_token
        elif hf.eos_token is None and hf.sep_token:
            completion["eos_token"] = hf.sep_token
        if hf.bos_token is None and hf.cls_token:
            completion["bos_token"] = hf.cls_token
        if hf.cls_token is None and hf.bos_token:
            completion["cls_token"] = hf.bos_token
        if completion:
            hf.add_special_tokens(completion)
        self.vocab_size: int = len(hf)

    def tokenize(self, text: str) -> list[int]:
        return self._hf(text).input_ids

    def tokenize_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list:
        import numpy

        # The fast tokenizer parallelises batches itself (RAYON); num_threads is advisory here.
        return [numpy.asarray(ids, dtype=numpy.int32) for ids in self._hf(list(texts)).input_ids]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids])

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._hf.convert_tokens_to_ids(token)

    @property
    def eod(self) -> int | None:
        return self._id(self._hf.eos_token)

    @property
    def eos(self) -> int | None:
        return self._id(self._hf.eos_token)

    @property
    def pad(self) -> int:
        pad = self._id(self._hf.pad_token)
        return -1 if pad is None else pad

    @property
    def bos(self) -> int | None:
        return self._id(self._hf.bos_token)

    @property
    def unk(self) -> int | None:
        return self._id(self._hf.unk_token)

    def special_token_id(self, name: str) -> int:
        vocab = self._hf.get_vocab()
        for token in special_token_spellings(name):
            if token in vocab:
                return vocab[token]
        raise KeyError(f"{self.path} has no special token {name!r} (tried {special_token_spellings(name)})")

    def token_to_id(self, piece: str) -> int:
        return self._hf.convert_tokens_to_ids(piece)

    def id_to_token(self, token_id: int) -> str:
        return self._hf.convert_ids_to_tokens(int(token_id))

    @property
    def vocab(self) -> list[str]:
        inverse = {index: token for token, index in self._hf.get_vocab().items()}
        return [inverse.get(i, "") for i in range(self.vocab_size)]

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("tokenizer_path", self.path)]
        )

    def apply_chat_template(self, conversation, **kwargs):
        return self._hf.apply_chat_template(conversation, **kwargs)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def build_tokenizer(tokenizer_type: str, tokenizer_model: str):
    """Tokenizer for ``--tokenizer-type`` / ``--tokenizer-model`` (local files only).

    ``"SentencePieceTokenizer"`` (alias ``"GPTSentencePieceTokenizer"``) takes a ``.model`` file;
    ``"HuggingFaceTokenizer"`` a local directory.
    """
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tokenizer = SentencePieceTokenizer(tokenizer_model)
    elif tokenizer_type == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(tokenizer_model)
    else:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {TOKENIZER_TYPES}")
    _register_with_megatron(type(tokenizer))
    return tokenizer
