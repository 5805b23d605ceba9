"""Input readers: jsonl (plain or gzip), parquet, `datasets` (hub name or local directory), source trees.

Owns :func:`plan_inputs` (which files, in which order, how big) and :func:`iter_batches`, which cuts the inputs
into :class:`~betterai_megatron.data.preprocess.worker.Batch` es of about ``batch_bytes``.

jsonl is read as bytes and never parsed here: a batch is a block of whole lines, so the main process only
finds line ends and counts them (Megatron-LM reads in text mode, where ``\\n``, ``\\r\\n`` and a lone ``\\r`` end
a line; ``bytes.splitlines`` in the worker splits the same way, and a ``\\r`` at a block's end is held back in
case ``\\n`` follows). Decoding, JSON and validation happen in the workers, so a bad line costs the main process
nothing. A UTF-8 byte-order mark at the start of a file is dropped.

Order: inputs in the order given, each glob's matches sorted; with ``--partitions N > 1`` a glob expands in
``glob.glob`` order, as Megatron-LM does, so the output order matches its. Source trees: files sorted by path.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass

from betterai_megatron.data.languages import language_from_path
from betterai_megatron.data.preprocess.config import PreprocessConfig
from betterai_megatron.data.preprocess.worker import SKIP_KEY, Batch

PARQUET_SUFFIXES = (".parquet", ".pq")


class InputError(ValueError):
    """An input that cannot be read at all (missing file, unknown format)."""


@dataclass
class InputPlan:
    """The resolved inputs and their total size (for the progress bar; 0 when unknown)."""

    files: list[str]
    total_bytes: int


def _expand(pattern: str, *, megatron_order: bool) -> list[str]:
    if os.path.exists(pattern):
        return [pattern]
    matches = glob.glob(pattern)
    if not matches:
        raise InputError(f"--input {pattern}: no such file")
    return matches if megatron_order else sorted(matches)


def plan_inputs(config: PreprocessConfig) -> InputPlan:
    """Resolve ``--input`` globs / ``--input-dir`` into an ordered file list."""
    if config.input_dir is not None:
        if not os.path.isdir(config.input_dir):
            raise InputError(f"--input-dir {config.input_dir}: not a directory")
        files = source_tree_files(config.input_dir)
        return InputPlan(files, sum(os.path.getsize(f) for f in files))
    if config.hf_dataset is not None:
        return InputPlan([config.hf_dataset], 0)
    files: list[str] = []
    for pattern in config.inputs:
        files.extend(_expand(pattern, megatron_order=config.partitions > 1))
    for path in files:
        if os.path.isdir(path):
            raise InputError(f"--input {path} is a directory; use --input-dir (source tree) or --hf-dataset")
    return InputPlan(files, sum(os.path.getsize(f) for f in files))


def source_tree_files(root: str) -> list[str]:
    """Files under ``root`` whose language is known from the extension, sorted; hidden directories skipped."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in names:
            path = os.path.join(directory, name)
            if language_from_path(path) != "unknown" and os.path.isfile(path):
                found.append(path)
    return sorted(found, key=lambda p: os.path.relpath(p, root))


# ------------------------------------------------------------------------------------------------- batches
class _Counter:
    """Batch and record numbering over all inputs."""

    def __init__(self) -> None:
        self.batch = 0
        self.record = 0
        self.last_count = 0

    def make(self, **fields) -> Batch:
        batch = Batch(index=self.batch, first_record=self.record, **fields)
        self.batch += 1
        return batch


def iter_batches(config: PreprocessConfig, plan: InputPlan) -> Iterator[Batch]:
    """All input as batches, in order."""
    counter = _Counter()
    if config.input_dir is not None:
        yield from _source_tree_batches(config, plan.files, counter)
    elif config.hf_dataset is not None:
        yield from _dataset_batches(config, counter)
    else:
        for path in plan.files:
            if path.endswith(PARQUET_SUFFIXES):
                yield from _parquet_batches(path, config, counter)
            else:
                yield from _jsonl_batches(path, config, counter)


def _count_lines(block: bytes) -> int:
    return block.count(b"\n") if b"\r" not in block else len(block.splitlines())


def _jsonl_batches(path: str, config: PreprocessConfig, counter: _Counter) -> Iterator[Batch]:
    opener = gzip.open if path.endswith(".gz") else open
    line = 1
    pending = b""
    first = True
    with opener(path, "rb") as handle:
        while True:
            chunk = handle.read(config.batch_bytes)
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            first = False
            block = pending + chunk
            if not chunk:
                if block:
                    yield _jsonl_batch(path, block, line, counter)
                return
            end = max(block.rfind(b"\n"), block.rfind(b"\r"))
            if end == len(block) - 1 and block.endswith(b"\r"):
                end = max(block.rfind(b"\n", 0, end), block.rfind(b"\r", 0, end))  # "\r" may pair with "\n"
            if end < 0:
                pending = block
                continue
            head, pending = block[:end + 1], block[end + 1:]
            batch = _jsonl_batch(path, head, line, counter)
            line += counter.last_count
            yield batch


def _jsonl_batch(path: str, block: bytes, line: int, counter: _Counter) -> Batch:
    batch = counter.make(source=path, first_line=line, raw=block, input_bytes=len(block))
    counter.last_count = _count_lines(block) if block.endswith((b"\n", b"\r")) else len(block.splitlines())
    counter.record += counter.last_count
    return batch


def _record_batches(source: str, rows: Iterator[dict], config: PreprocessConfig, counter: _Counter,
                    rows_per_batch: int) -> Iterator[Batch]:
    records, size, row = [], 0, 1
    for record in rows:
        records.append(record)
        size += sum(len(v) for v in record.values() if isinstance(v, (str, bytes)))
        if len(records) >= rows_per_batch or size >= config.batch_bytes:
            yield counter.make(source=source, first_line=row, records=records, input_bytes=size)
            counter.record += len(records)
            row += len(records)
            records, size = [], 0
    if records:
        yield counter.make(source=source, first_line=row, records=records, input_bytes=size)
        counter.record += len(records)


def _parquet_batches(path: str, config: PreprocessConfig, counter: _Counter) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid/OSError family
        raise InputError(f"{path}: not a readable parquet file ({error})") from error

    def rows() -> Iterator[dict]:
        for record_batch in parquet.iter_batches(batch_size=1024):
            yield from record_batch.to_pylist()

    yield from _record_batches(path, rows(), config, counter, rows_per_batch=4096)


def _dataset_batches(config: PreprocessConfig, counter: _Counter) -> Iterator[Batch]:
    import datasets

    name = config.hf_dataset
    try:
        if os.path.isdir(name) and (os.path.exists(os.path.join(name, "dataset_info.json"))
                                    or os.path.exists(os.path.join(name, "state.json"))):
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[config.hf_split]
        else:
            dataset = datasets.load_dataset(name, split=config.hf_split)
    except Exception as error:  # datasets raises many types; the message is what the user needs
        raise InputError(f"--hf-dataset {name} (split {config.hf_split}): cannot load ({error})") from error

    def rows() -> Iterator[dict]:
        for columns in dataset.iter(batch_size=1024):
            keys = list(columns)
            for values in zip(*(columns[k] for k in keys)):
                yield dict(zip(keys, values))

    yield from _record_batches(name, rows(), config, counter, rows_per_batch=4096)


def _source_tree_batches(config: PreprocessConfig, files: list[str], counter: _Counter) -> Iterator[Batch]:
    records, rejected, size = [], [], 0
    first_line = 1
    for path in files:
        relative = os.path.relpath(path, config.input_dir)
        reason, text = _read_source(path, config.max_file_bytes)
        if reason is not None:
            # A rejected file keeps its place (a placeholder the worker skips), so numbering stays aligned.
            records.append({SKIP_KEY: True})
            rejected.append((relative, 0, reason, ""))
        else:
            records.append({"text": text, "lang": language_from_path(path), "path": relative})
            size += len(text)
        if size >= config.batch_bytes or len(records) >= 4096:
            yield _tree_batch(config.input_dir, first_line, records, rejected, size, counter)
            first_line += len(records)
            records, rejected, size = [], [], 0
    if records:
        yield _tree_batch(config.input_dir, first_line, records, rejected, size, counter)


def _tree_batch(root: str, first_line: int, records: list, rejected: list, size: int, counter: _Counter) -> Batch:
    batch = counter.make(source=root, first_line=first_line, records=records, rejected=rejected, input_bytes=size)
    counter.record += len(records)
    return batch


def _read_source(path: str, max_bytes: int) -> tuple[str | None, str | None]:
    """(reason, None) for a file that cannot be a document, else (None, text)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        return f"file has {size} bytes, over --max-file-bytes {max_bytes}", None
    with open(path, "rb") as handle:
        raw = handle.read()
    if b"\x00" in raw:
        return "binary file (NUL byte)", None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"invalid UTF-8 at byte {error.start}", None
    return None, text.removeprefix("\ufeff")
