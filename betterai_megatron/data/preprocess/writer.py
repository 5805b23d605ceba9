"""Output files of a preprocessing run, written with megatron-core's ``IndexedDatasetBuilder``, atomically.

Owns :class:`OutputWriter`. Per output key it writes ``{prefix}_{key}_document.bin/.idx`` (Megatron-LM's names),
plus beside each: ``.lang.npy`` (uint8 language id per document) and ``.languages.json`` (id -> name for the
languages present); per run: ``{prefix}.rejected.jsonl`` (one JSON object per rejected record: file, line,
reason, raw) and ``{prefix}.summary.json``.

Every file is written under a temporary name in the destination directory and renamed into place only when
the run completes (``os.replace`` is atomic on one filesystem); :meth:`OutputWriter.abort` removes the
temporaries, so a failed or strict-mode run leaves no partial output and never clobbers an earlier good one.

``--partitions N`` (N > 1, round-robin) reproduces Megatron-LM's output order: record i goes to partition
``i % N``, each partition is built by its own builder, and the partitions are concatenated in order with
``IndexedDatasetBuilder.add_index``, exactly as Megatron-LM merges them. ``--keep-sequential-samples`` keeps input
order, which equals the single-builder output, so no partitions are built for it.

The builder's module is supplied by a callable (a background import): results that arrive before it is loaded
are held in memory, so the workers never wait for the import.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import numpy

from betterai_megatron.data.languages import LANGUAGES, document_languages_paths
from betterai_megatron.data.preprocess.worker import EncodedBatch

MAX_PRINTED_REJECTIONS = 20


def bin_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's name for one key's dataset: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def optimal_dtype_name(vocab_size: int) -> str:
    """The .bin token dtype megatron-core picks (``DType.optimal_dtype``): uint16 below 65500, else int32."""
    return "uint16" if vocab_size < 65500 else "int32"


class OutputWriter:
    """Collects encoded batches in order and writes the run's files (see module docstring)."""

    def __init__(self, *, output_prefix: str, keys: tuple[str, ...], vocab_size: int, partitions: int,
                 module: Callable[[], object], module_ready: Callable[[], bool]) -> None:
        self.output_prefix = output_prefix
        self.keys = keys
        self.vocab_size = vocab_size
        self.dtype = numpy.dtype(optimal_dtype_name(vocab_size))
        self.partitions = partitions
        self._module, self._module_ready = module, module_ready
        self._tag = f".tmp{os.getpid()}"
        self._temporaries: list[str] = []
        self._builders: list[list] | None = None  # [key][partition]
        self._held: list[EncodedBatch] = []
        self._languages: list[list] = [[] for _ in range(partitions)]
        self.rejected_count = 0
        directory = os.path.dirname(os.path.abspath(output_prefix))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--output-prefix {output_prefix}: directory {directory} does not exist")
        self._rejected_path = self._temporary(f"{output_prefix}.rejected.jsonl")
        self._rejected = open(self._rejected_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finalize/abort

    def _register(self, path: str) -> str:
        self._temporaries.append(path)
        return path

    def _temporary(self, final_path: str) -> str:
        return self._register(final_path + self._tag)

    def _partition_prefix(self, key: str, partition: int) -> str:
        prefix = bin_prefix(self.output_prefix, key)
        return prefix if self.partitions == 1 else f"{prefix}.part{partition}{self._tag}"

    def _open_builders(self) -> None:
        module = self._module()
        if numpy.dtype(module.DType.optimal_dtype(self.vocab_size)) != self.dtype:
            raise AssertionError("the workers' token dtype differs from megatron-core's DType.optimal_dtype")
        self._builders = []
        for key in self.keys:
            row = []
            for partition in range(self.partitions):
                if self.partitions == 1:
                    path = self._temporary(bin_prefix(self.output_prefix, key) + ".bin")
                else:
                    path = self._register(self._partition_prefix(key, partition) + ".bin")
                row.append(module.IndexedDatasetBuilder(path, dtype=self.dtype.type))
            self._builders.append(row)

    # -- adding --------------------------------------------------------------------------------------------------
    def add(self, result: EncodedBatch) -> None:
        """Record rejections now; write documents now or, while megatron-core is still loading, later."""
        self._record_rejections(result.rejected)
        if self._builders is None:
            if not self._module_ready():
                self._held.append(result)
                return
            self._open_builders()
        for held in self._held:
            self._write(held)
        self._held.clear()
        self._write(result)

    def _write(self, result: EncodedBatch) -> None:
        partitions = (result.record_indices % self.partitions) if self.partitions > 1 else None
        for k, key_tokens in enumerate(result.keys):
            tokens, lengths = key_tokens.tokens, key_tokens.sequence_lengths.tolist()
            token_ends = numpy.cumsum(key_tokens.document_tokens).tolist()
            sequence_ends = numpy.cumsum(key_tokens.sequences_per_document).tolist()
            token_start = sequence_start = 0
            row = self._builders[k]
            for d, (token_end, sequence_end) in enumerate(zip(token_ends, sequence_ends)):
                builder = row[0] if partitions is None else row[partitions[d]]
                builder.add_document(tokens[token_start:token_end], lengths[sequence_start:sequence_end])
                token_start, sequence_start = token_end, sequence_end
        if partitions is None:
            self._languages[0].append(result.languages)
        else:
            for p in range(self.partitions):
                self._languages[p].append(result.languages[partitions == p])

    def _record_rejections(self, rejected: list) -> None:
        for source, line, reason, raw in rejected:
            self.rejected_count += 1
            where = f"{source}:{line}" if line else source
            if self.rejected_count <= MAX_PRINTED_REJECTIONS:
                print(f"{where}: {reason} (skipped)", file=sys.stderr)
            elif self.rejected_count == MAX_PRINTED_REJECTIONS + 1:
                print(f"... more rejected records, see {self.output_prefix}.rejected.jsonl", file=sys.stderr)
            record = {"file": source, "line": line, "reason": reason, "raw": raw}
            self._rejected.write(json.dumps(record, ensure_ascii=False) + "\n")

    # -- finishing -----------------------------------------------------------------------------------------------
    def finalize(self, make_summary: Callable[[], dict]) -> list[str]:
        """Finish every file, then ``make_summary()`` (timed after the data files), rename all into place."""
        if self._builders is None:
            self._open_builders()
        for held in self._held:
            self._write(held)
        self._held.clear()
        module = self._module()
        languages = numpy.concatenate([a for part in self._languages for a in part]) if any(
            self._languages) else numpy.zeros(0, dtype=numpy.uint8)
        moves: list[tuple[str, str]] = []
        for k, key in enumerate(self.keys):
            final = bin_prefix(self.output_prefix, key)
            builders = self._builders[k]
            if self.partitions > 1:
                for p, builder in enumerate(builders):
                    builder.finalize(self._register(self._partition_prefix(key, p) + ".idx"))
                merged = module.IndexedDatasetBuilder(self._temporary(final + ".bin"), dtype=self.dtype.type)
                for p in range(self.partitions):
                    merged.add_index(self._partition_prefix(key, p))
                builders = [merged]
            builders[0].finalize(self._temporary(final + ".idx"))
            moves += [(final + ".bin" + self._tag, final + ".bin"), (final + ".idx" + self._tag, final + ".idx")]
            moves += self._write_languages(final, languages)
        self._rejected.close()
        moves.append((self._rejected_path, f"{self.output_prefix}.rejected.jsonl"))
        summary_path = self._temporary(f"{self.output_prefix}.summary.json")
        with open(summary_path, "w", encoding="utf-8") as handle:
            json.dump(make_summary(), handle, indent=2)
            handle.write("\n")
        moves.append((summary_path, f"{self.output_prefix}.summary.json"))
        for source, target in moves:
            os.replace(source, target)
        self._remove_temporaries()
        return [target for _, target in moves]

    def _write_languages(self, final: str, languages: numpy.ndarray) -> list[tuple[str, str]]:
        ids_path, names_path = document_languages_paths(final)
        with open(self._temporary(ids_path), "wb") as handle:
            numpy.save(handle, languages.astype(numpy.uint8), allow_pickle=False)
        present = sorted(set(numpy.unique(languages).tolist()))
        with open(self._temporary(names_path), "w", encoding="utf-8") as handle:
            json.dump({str(i): LANGUAGES[i] for i in present}, handle)
        return [(ids_path + self._tag, ids_path), (names_path + self._tag, names_path)]

    def _remove_temporaries(self) -> None:
        for path in self._temporaries:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Close and delete everything written so far; final paths are untouched."""
        if not self._rejected.closed:
            self._rejected.close()
        for row in self._builders or []:
            for builder in row:
                if not builder.data_file.closed:
                    builder.data_file.close()
        self._remove_temporaries()
