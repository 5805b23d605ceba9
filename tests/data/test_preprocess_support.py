"""Shared helpers for the tokenizer/preprocessing tests: a small code tokenizer, and the independent references.

The references do not use the code under test:

- :func:`reference_outputs` is Megatron-LM's algorithm written plainly: read the file in Python text mode (as
  Megatron-LM does), ``json.loads`` each line, ``sentencepiece.encode_as_ids`` each sentence, drop empty
  sentences, append eod, ``IndexedDatasetBuilder.add_document`` one document at a time, single process.
- :func:`parse_idx` reads an ``.idx`` by hand from the documented layout (megatron-core
  ``indexed_dataset._IndexWriter``): 9-byte magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code,
  ``<Q`` sequence count, ``<Q`` document count, then int32 sequence lengths, int64 byte pointers, int64
  document indices.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from betterai_megatron.data.builtin_corpus import (
    BuiltinCorpusConfig,
    write_builtin_corpus,
)
from betterai_megatron.data.tokenizer_training import (
    TokenizerTrainingConfig,
    train_tokenizer,
)

SMALL_VOCAB = 700


def stdlib_texts(tmp_path: Path, *, max_files: int = 40) -> list[str]:
    path = tmp_path / "stdlib.jsonl"
    write_builtin_corpus(path, config=BuiltinCorpusConfig(max_files=max_files, max_bytes=600_000))
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def code_model(tmp_path_factory) -> str:
    """A small BPE code tokenizer trained by tools/train_tokenizer.py's library on stdlib sources."""
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = stdlib_texts(directory)
    return train_tokenizer(texts, str(directory / "code"),
                           config=TokenizerTrainingConfig(vocab_size=SMALL_VOCAB, num_threads=2))


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    return path


def reference_outputs(lines: list[str], model_path: str, prefix: Path, *, keys=("text",),
                      append_eod: bool = True, hf: bool = False) -> dict[str, tuple[bytes, bytes]]:
    """Megatron-LM's per-document algorithm, plainly; returns {key: (bin bytes, idx bytes)}.

    ``hf``: ``model_path`` is a HuggingFace tokenizer directory, encoded with ``AutoTokenizer(text).input_ids``.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if hf:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        sp = _HFAsSentencePiece(auto)
    else:
        sp = spm.SentencePieceProcessor(model_file=model_path)
    dtype = DType.optimal_dtype(sp.get_piece_size())
    out = {}
    for key in keys:
        bin_path, idx_path = Path(f"{prefix}_{key}.bin"), Path(f"{prefix}_{key}.idx")
        builder = IndexedDatasetBuilder(str(bin_path), dtype=dtype)
        for line in lines:
            value = json.loads(line)[key]
            sentences = value if isinstance(value, list) else [value]
            doc, lengths = [], []
            for sentence in sentences:
                ids = sp.encode_as_ids(sentence)
                if ids:
                    doc.extend(ids)
                    lengths.append(len(ids))
            if doc and append_eod:
                doc.append(sp.eos_id())
                lengths[-1] += 1
            builder.add_document(doc, lengths)
        builder.finalize(str(idx_path))
        out[key] = (bin_path.read_bytes(), idx_path.read_bytes())
    return out


class _HFAsSentencePiece:
    """The three calls the reference makes, answered by a transformers tokenizer."""

    def __init__(self, auto) -> None:
        self.auto = auto

    def get_piece_size(self) -> int:
        return len(self.auto)

    def encode_as_ids(self, text: str) -> list[int]:
        return self.auto(text).input_ids

    def eos_id(self) -> int:
        return self.auto.convert_tokens_to_ids(self.auto.eos_token)


def hf_tokenizer_dir(directory: Path, texts: list[str]) -> str:
    """A small byte-level BPE saved as a local transformers tokenizer directory (no hub)."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<fim_prefix>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)
    return str(directory)


def text_mode_lines(path: Path) -> list[str]:
    """The lines Megatron-LM's ``for line in open(path, encoding='utf-8')`` sees."""
    with open(path, "r", encoding="utf-8") as handle:
        return list(handle)


def output_bytes(prefix: str, key: str = "text") -> tuple[bytes, bytes]:
    stem = f"{prefix}_{key}_document"
    return Path(stem + ".bin").read_bytes(), Path(stem + ".idx").read_bytes()


def parse_idx(data: bytes) -> dict:
    """The .idx fields, parsed by hand from the documented layout."""
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", data[9:17])
    (dtype_code,) = struct.unpack("<B", data[17:18])
    sequence_count, document_count = struct.unpack("<QQ", data[18:34])
    offset = 34
    lengths = np.frombuffer(data, dtype=np.int32, count=sequence_count, offset=offset)
    offset += 4 * sequence_count
    pointers = np.frombuffer(data, dtype=np.int64, count=sequence_count, offset=offset)
    offset += 8 * sequence_count
    documents = np.frombuffer(data, dtype=np.int64, count=document_count, offset=offset)
    offset += 8 * document_count
    return {"version": version, "dtype_code": dtype_code, "lengths": lengths, "pointers": pointers,
            "document_indices": documents, "trailing_bytes": len(data) - offset}


def test_parse_idx_reads_a_hand_built_index():
    # A hand-assembled index: 2 sequences of lengths 3 and 2 (uint16), documents [0, 1, 2].
    data = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 2, 3)
            + np.array([3, 2], np.int32).tobytes() + np.array([0, 6], np.int64).tobytes()
            + np.array([0, 1, 2], np.int64).tobytes())
    fields = parse_idx(data)
    assert fields["version"] == 1 and fields["dtype_code"] == 8 and fields["trailing_bytes"] == 0
    assert fields["lengths"].tolist() == [3, 2] and fields["pointers"].tolist() == [0, 6]
    assert fields["document_indices"].tolist() == [0, 1, 2]
