"""Training a sentencepiece code tokenizer (BPE or unigram) from jsonl, parquet, HF datasets or source trees.

Owns :class:`TokenizerTrainingConfig` and :func:`train_tokenizer`. The trainer settings are the ones code needs
(Kudo & Richardson 2018, sentencepiece; the code-model practice of CodeLlama/StarCoder-style vocabularies):

- ``normalization_rule_name="identity"``: no NFKC, code is kept byte for byte;
- ``remove_extra_whitespaces=False`` and ``allow_whitespace_only_pieces=True``: indentation survives and runs of
  spaces become single pieces (``"▁▁▁▁"``);
- ``add_dummy_prefix=False``: a document's first token is not a fake space;
- ``byte_fallback=True``: any UTF-8 input encodes without ``<unk>``; ``split_digits=True``;
- newlines are representable: documents are fed through ``sentence_iterator`` as multi-line chunks
  (sentencepiece otherwise treats each input *line* as a sentence, so ``\\n`` would never be seen and every
  newline would cost a byte-fallback token); chunks end at line boundaries and respect ``max_sentence_length``;
- ids 0-3 are ``<unk>``, ``<s>`` (bos), ``</s>`` (eos = Megatron's eod), ``<pad>``, then the chat template,
  reasoning and fill-in-the-middle tokens as *user-defined* symbols (matched in text, so a rendered template
  encodes to the special ids), see :data:`betterai_megatron.data.tokenizer.SPECIAL_TOKENS`;
- deterministic: ``sentencepiece.set_random_generator_seed(seed)`` fixes sampling and shuffling, and the input
  order is the reader's (sorted for source trees).

The result is a ``{prefix}.model`` (+ ``{prefix}.vocab``) that megatron-core's and Megatron-LM's
``SentencePieceTokenizer`` and our ``tools/preprocess_data.py`` load as is.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from betterai_megatron.data.tokenizer import SPECIAL_TOKENS

DEFAULT_USER_SYMBOLS: tuple[str, ...] = tuple(
    SPECIAL_TOKENS[name][0]
    for name in ("im_start", "im_end", "think_start", "think_end", "fim_prefix", "fim_middle", "fim_suffix",
                 "fim_pad", "endoftext")
)


@dataclass
class TokenizerTrainingConfig:
    """sentencepiece trainer settings for code (defaults: 32k BPE)."""

    vocab_size: int = 32000
    model_type: str = "bpe"  # "bpe" or "unigram"
    seed: int = 1234
    character_coverage: float = 0.9999
    max_sentence_length_bytes: int = 16384  # longest chunk fed to the trainer
    input_sentence_size: int = 2_000_000  # chunks sampled for training (0 = all)
    max_piece_length: int = 16
    num_threads: int = 2
    split_digits: bool = True
    user_defined_symbols: tuple[str, ...] = DEFAULT_USER_SYMBOLS
    extra_symbols: tuple[str, ...] = field(default_factory=tuple)  # more user-defined symbols

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
        if self.vocab_size < 16 + len(self.user_defined_symbols) + len(self.extra_symbols):
            raise ValueError(f"vocab_size {self.vocab_size} is too small for the special tokens")


def chunk_document(text: str, *, max_bytes: int) -> Iterator[str]:
    """Split a document into chunks of whole lines (newlines kept), each at most ``max_bytes`` UTF-8 bytes.

    A single line longer than ``max_bytes`` is cut at a character boundary so no text is lost.
    """
    buffer: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line_size = len(line.encode("utf-8"))
        if size + line_size > max_bytes and buffer:
            yield "".join(buffer)
            buffer, size = [], 0
        while line_size > max_bytes:
            head, line = _cut_utf8(line, max_bytes)
            yield head
            line_size = len(line.encode("utf-8"))
        buffer.append(line)
        size += line_size
    if buffer:
        yield "".join(buffer)


def _cut_utf8(line: str, max_bytes: int) -> tuple[str, str]:
    encoded = line.encode("utf-8")[:max_bytes]
    head = encoded.decode("utf-8", errors="ignore")
    return head, line[len(head):]


def train_tokenizer(texts: Iterable[str], model_prefix: str, *, config: TokenizerTrainingConfig) -> str:
    """Train on ``texts`` (one document each); writes ``{model_prefix}.model`` and ``.vocab``; returns the path.

    Both files appear atomically (written in memory, then renamed into place).
    """
    import sentencepiece

    config.validate()
    symbols = list(dict.fromkeys(config.user_defined_symbols + tuple(config.extra_symbols)))
    documents = {"count": 0}

    def sentences() -> Iterator[str]:
        for text in texts:
            documents["count"] += 1
            yield from chunk_document(text, max_bytes=config.max_sentence_length_bytes)

    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(config.seed)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=config.character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=config.split_digits,
        byte_fallback=True,
        max_sentence_length=config.max_sentence_length_bytes,
        max_sentencepiece_length=config.max_piece_length,
        input_sentence_size=config.input_sentence_size,
        shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        user_defined_symbols=symbols,
        num_threads=config.num_threads,
        minloglevel=2,
    )
    if documents["count"] == 0:
        raise ValueError("no training text: the inputs held no documents")
    model_path = f"{model_prefix}.model"
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    _write_atomically(model_path, model.getvalue())
    _write_atomically(f"{model_prefix}.vocab", _vocab_text(model.getvalue()))
    return model_path


def _vocab_text(model_bytes: bytes) -> bytes:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    return "".join(lines).encode("utf-8")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser) -> None:
    """Flags of ``tools/train_tokenizer.py`` / ``betterai train-tokenizer``."""
    parser.add_argument("--input", nargs="+", default=[], help="jsonl, jsonl.gz or parquet files (globs allowed)")
    parser.add_argument("--input-dir", default=None, help="a source tree (files of known languages)")
    parser.add_argument("--hf-dataset", default=None, help="a `datasets` name or a local dataset directory")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--builtin-corpus", action="store_true",
                        help="train on the interpreter's standard library sources (no download)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="text fields (raw schema)")
    parser.add_argument("--schema", default="raw",
                        choices=["raw", "the-stack", "magicoder", "code-feedback", "codeultrafeedback"])
    parser.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--character-coverage", type=float, default=0.9999)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="chunks sampled for training (0 = all)")
    parser.add_argument("--max-sentence-length-bytes", type=int, default=16384)
    parser.add_argument("--extra-symbols", nargs="*", default=[], help="more user-defined special tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)


def iter_training_texts(args) -> Iterator[str]:
    """Documents from the chosen inputs, through the preprocessor's readers and schemas (bad records skipped)."""
    import json as _json

    from betterai_megatron.data.preprocess.config import PreprocessConfig
    from betterai_megatron.data.preprocess.readers import iter_batches, plan_inputs
    from betterai_megatron.data.preprocess.schemas import RecordError, extract

    if args.builtin_corpus:
        from betterai_megatron.data.builtin_corpus import (
            read_python_source,
            stdlib_source_files,
        )

        for path in stdlib_source_files():
            text = read_python_source(path)
            if text:
                yield text
        return
    config = PreprocessConfig(output_prefix=args.model_prefix, inputs=list(args.input), input_dir=args.input_dir,
                              hf_dataset=args.hf_dataset, hf_split=args.hf_split, tokenizer_model="-",
                              json_keys=tuple(args.json_keys), schema=args.schema)
    config.validate()
    for batch in iter_batches(config, plan_inputs(config)):
        items = batch.lines() if batch.raw is not None else batch.records or []
        for item in items:
            try:
                record = _json.loads(item) if isinstance(item, bytes) else item
                texts, _ = extract(record, schema=config.schema, json_keys=config.json_keys, language_key="lang")
            except (ValueError, RecordError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                continue
            for value in texts:
                yield from ([value] if isinstance(value, str) else value)


def main(args) -> int:
    config = TokenizerTrainingConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, seed=args.seed,
        character_coverage=args.character_coverage, input_sentence_size=args.input_sentence_size,
        max_sentence_length_bytes=args.max_sentence_length_bytes, extra_symbols=tuple(args.extra_symbols),
        num_threads=args.threads)
    sources = [bool(args.input), args.input_dir is not None, args.hf_dataset is not None, args.builtin_corpus]
    if sum(sources) != 1:
        print("error: give exactly one of --input, --input-dir, --hf-dataset, --builtin-corpus", file=sys.stderr)
        return 2
    try:
        path = train_tokenizer(iter_training_texts(args), args.model_prefix, config=config)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    print(f"wrote {path} ({sp.get_piece_size()} pieces, {config.model_type}); eod=</s> id {sp.eos_id()}, "
          f"pad id {sp.pad_id()}")
    return 0
