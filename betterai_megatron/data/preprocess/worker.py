"""Worker side of preprocessing: one batch of raw input in, one batch of token arrays out.

Owns :class:`Batch` (what the reader hands a worker: a block of jsonl bytes, or decoded records),
:class:`EncodedBatch` (what comes back: per output key the batch's tokens as one numpy array plus sequence
lengths, per document its language id, and the rejected records with reasons) and :func:`encode_batch`.

Per document the result is exactly Megatron-LM's ``Encoder.encode`` (tools/preprocess_data.py): each sentence
(the string, or each string of a list) is tokenized; sentences with no tokens are dropped; with ``append_eod``
the eod id is appended to the last sentence when the document has any token; a document with no token stays a
document with zero sequences. The difference is throughput: a whole batch goes through one
``tokenize_batch`` call and returns as a few numpy arrays, so nothing is pickled per document.

Bad records never raise: each becomes ``(source, line, reason, raw)`` in ``EncodedBatch.rejected``. Reasons:
blank line, invalid UTF-8, malformed JSON, not an object, missing key, null or non-string value, lone
surrogate (a ``\\udXXX`` escape without its pair, which no UTF-8 tokenizer can encode).

Fault injection for tests (the real process, really dying): ``BETTERAI_PREPROCESS_FAULT=exit:MARKER`` makes a
worker ``os._exit(3)`` on a document containing MARKER; ``raise:MARKER`` raises instead.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field

import numpy

from betterai_megatron.data.languages import LANGUAGE_IDS
from betterai_megatron.data.preprocess.schemas import RecordError, extract

FAULT_ENV = "BETTERAI_PREPROCESS_FAULT"
RAW_PREVIEW_CHARS = 1 << 16  # rejected.jsonl keeps at most this much of a bad line
SKIP_KEY = "__rejected_by_reader__"  # placeholder record for an item the reader already rejected


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to turn records into tokens (picklable; identical in every worker)."""

    tokenizer_type: str
    tokenizer_model: str
    schema: str
    json_keys: tuple[str, ...]
    language_key: str
    languages: frozenset[str] | None
    append_eod: bool
    dtype: str  # numpy dtype name of the .bin ("uint16" or "int32")
    encode_threads: int = 1


@dataclass
class Batch:
    """A unit of work. Either ``raw`` (jsonl bytes, lines split like Python's text mode) or ``records``."""

    index: int
    source: str
    first_line: int  # 1-based line (or row) number of the first item, for messages
    first_record: int  # 0-based index of the first item over all inputs (Megatron's partition assignment)
    raw: bytes | None = None
    records: list | None = None
    rejected: list = field(default_factory=list)  # found by the reader: (source, line, reason, raw)
    input_bytes: int = 0

    def lines(self) -> list[bytes]:
        return self.raw.splitlines() if self.raw is not None else []

    def split(self) -> list[Batch]:
        """One batch per item, to find the item that kills a worker."""
        items = self.lines() if self.raw is not None else list(self.records or [])
        parts = []
        for offset, item in enumerate(items):
            part = Batch(index=self.index, source=self.source, first_line=self.first_line + offset,
                         first_record=self.first_record + offset)
            if self.raw is not None:
                part.raw, part.input_bytes = item, len(item) + 1
            else:
                part.records = [item]
            parts.append(part)
        if parts:
            parts[0].rejected = list(self.rejected)
        return parts


@dataclass
class KeyTokens:
    """One output key's share of a batch: ``tokens [n_tokens]`` in the .bin dtype, ``sequence_lengths
    [n_sequences]`` int32, ``sequences_per_document [n_documents]`` int32, ``document_tokens [n_documents]``."""

    tokens: numpy.ndarray
    sequence_lengths: numpy.ndarray
    sequences_per_document: numpy.ndarray
    document_tokens: numpy.ndarray


@dataclass
class EncodedBatch:
    """A batch's kept documents (in input order) and its rejections."""

    index: int
    record_indices: numpy.ndarray  # [n_documents] int64, position over all inputs (for --partitions)
    languages: numpy.ndarray  # [n_documents] uint8 language ids
    keys: list[KeyTokens]
    rejected: list = field(default_factory=list)  # (source, line, reason, raw)
    filtered: dict = field(default_factory=dict)  # language -> documents dropped by --languages
    input_bytes: int = 0

    @property
    def documents(self) -> int:
        return len(self.languages)

    @staticmethod
    def concat(index: int, parts: list[EncodedBatch], n_keys: int, dtype: str) -> EncodedBatch:
        """Join the results of a split batch back into one, in order."""
        keys = []
        for k in range(n_keys):
            keys.append(KeyTokens(*(
                _cat([getattr(p.keys[k], name) for p in parts], kind)
                for name, kind in (("tokens", dtype), ("sequence_lengths", "int32"),
                                   ("sequences_per_document", "int32"), ("document_tokens", "int64")))))
        filtered: dict = {}
        for part in parts:
            for language, count in part.filtered.items():
                filtered[language] = filtered.get(language, 0) + count
        return EncodedBatch(
            index=index, record_indices=_cat([p.record_indices for p in parts], "int64"),
            languages=_cat([p.languages for p in parts], "uint8"), keys=keys,
            rejected=[r for p in parts for r in p.rejected], filtered=filtered,
            input_bytes=sum(p.input_bytes for p in parts))

    @staticmethod
    def crashed(batch: Batch, n_keys: int, dtype: str, reason: str) -> EncodedBatch:
        """The result for a single-item batch whose worker died: the item is rejected with ``reason``."""
        raw = batch.raw if batch.raw is not None else json.dumps(batch.records, default=str).encode()
        empty = EncodedBatch.concat(batch.index, [], n_keys, dtype)
        empty.rejected = list(batch.rejected) + [(batch.source, batch.first_line, reason, _preview(raw))]
        empty.input_bytes = batch.input_bytes
        return empty


def _cat(arrays: list, dtype: str) -> numpy.ndarray:
    return numpy.concatenate(arrays).astype(dtype, copy=False) if arrays else numpy.zeros(0, dtype=dtype)


def _preview(raw: bytes) -> str:
    return raw[:RAW_PREVIEW_CHARS].decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------------------------- worker state
_STATE: dict = {}


def prepare(settings: EncodeSettings, tokenizer=None) -> None:
    """Load the tokenizer once per process (the parent calls this before forking so workers inherit it)."""
    fault = os.environ.get(FAULT_ENV, "")
    kind, _, marker = fault.partition(":")
    _STATE["fault"] = (kind, marker) if marker else None
    if tokenizer is None and _STATE.get("settings") == settings:
        return
    if tokenizer is None:
        from betterai_megatron.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(settings.tokenizer_type, settings.tokenizer_model)
    _STATE.update(settings=settings, tokenizer=tokenizer)


def worker_initializer(settings: EncodeSettings) -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it stops the pool and removes partial output)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prepare(settings)


# ---------------------------------------------------------------------------------------------- encoding
def _parse_line(line: bytes, settings: EncodeSettings) -> tuple[list, str]:
    if not line.strip():
        raise RecordError("blank line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"invalid UTF-8 at byte {error.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"malformed JSON: {error.msg} at column {error.colno}") from None
    texts, language = extract(record, schema=settings.schema, json_keys=settings.json_keys,
                              language_key=settings.language_key)
    if "\\u" in text:  # only an escape can produce a lone surrogate
        _check_surrogates(texts)
    return texts, language


def _check_surrogates(texts: list) -> None:
    for value in texts:
        for sentence in [value] if isinstance(value, str) else value:
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError as error:
                raise RecordError(f"lone surrogate {sentence[error.start]!r} at character {error.start}") from None


def _inject_fault(texts: list) -> None:
    kind, marker = _STATE["fault"]
    for value in texts:
        if any(marker in sentence for sentence in ([value] if isinstance(value, str) else value)):
            if kind == "exit":
                os._exit(3)
            raise RuntimeError(f"injected fault on a document containing {marker!r}")


def _parse(batch: Batch, settings: EncodeSettings):
    """Kept (record_index, texts, language) in order, plus rejections and filtered counts."""
    kept, rejected, filtered = [], list(batch.rejected), {}
    items = batch.lines() if batch.raw is not None else (batch.records or [])
    for offset, item in enumerate(items):
        if batch.raw is None and isinstance(item, dict) and SKIP_KEY in item:
            continue
        try:
            if batch.raw is not None:
                texts, language = _parse_line(item, settings)
            else:
                texts, language = extract(item, schema=settings.schema, json_keys=settings.json_keys,
                                          language_key=settings.language_key)
                _check_surrogates(texts)
        except RecordError as error:
            raw = item if isinstance(item, bytes) else json.dumps(item, default=str).encode("utf-8", "replace")
            rejected.append((batch.source, batch.first_line + offset, str(error), _preview(raw)))
            continue
        if settings.languages is not None and language not in settings.languages:
            filtered[language] = filtered.get(language, 0) + 1
            continue
        kept.append((batch.first_record + offset, texts, language))
    return kept, rejected, filtered


def _assemble(per_document: list[list], ids: list, settings: EncodeSettings, eod: int) -> KeyTokens:
    """Megatron's per-document rule applied to a batch; ``per_document[d]`` = number of sentences of d."""
    parts, sequence_lengths, sequences, totals = [], [], [], []
    eod_array = numpy.array([eod], dtype=numpy.int32)
    position = 0
    for sentence_count in per_document:
        kept = 0
        total = 0
        for sentence_ids in ids[position:position + sentence_count]:
            if len(sentence_ids):
                parts.append(sentence_ids)
                sequence_lengths.append(len(sentence_ids))
                kept += 1
                total += len(sentence_ids)
        position += sentence_count
        if total and settings.append_eod:
            parts.append(eod_array)
            sequence_lengths[-1] += 1
            total += 1
        sequences.append(kept)
        totals.append(total)
    return KeyTokens(
        tokens=_cat(parts, settings.dtype),
        sequence_lengths=numpy.array(sequence_lengths, dtype=numpy.int32),
        sequences_per_document=numpy.array(sequences, dtype=numpy.int32),
        document_tokens=numpy.array(totals, dtype=numpy.int64))


def encode_batch(batch: Batch) -> EncodedBatch:
    """Parse, validate, filter and tokenize one batch (runs in a worker process)."""
    settings, tokenizer = _STATE["settings"], _STATE["tokenizer"]
    kept, rejected, filtered = _parse(batch, settings)
    if _STATE["fault"]:
        for _, texts, _ in kept:
            _inject_fault(texts)
    keys = []
    for k in range(len(settings.json_keys) if settings.schema == "raw" else 1):
        flat, per_document = [], []
        for _, texts, _ in kept:
            value = texts[k]
            if isinstance(value, str):
                flat.append(value)
                per_document.append(1)
            else:
                flat.extend(value)
                per_document.append(len(value))
        ids = tokenizer.tokenize_batch(flat, num_threads=settings.encode_threads) if flat else []
        keys.append(_assemble(per_document, ids, settings, tokenizer.eod if settings.append_eod else -1))
    return EncodedBatch(
        index=batch.index,
        record_indices=numpy.array([r for r, _, _ in kept], dtype=numpy.int64),
        languages=numpy.array([LANGUAGE_IDS[language] for _, _, language in kept], dtype=numpy.uint8),
        keys=keys, rejected=rejected, filtered=filtered, input_bytes=batch.input_bytes)
