"""One preprocessing run: inputs -> workers -> ``.bin/.idx`` + sidecars + summary.

Owns :func:`run_preprocess` (the library entry point; ``tools/preprocess_data.py`` is a thin CLI over it) and
:class:`StrictModeError`. Order of events, chosen for speed on small machines: load the tokenizer, fork the
workers (they inherit it), *then* import megatron-core's writer on a background thread while the workers
tokenize, so the multi-second torch/megatron import overlaps the real work instead of preceding it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy

from betterai_megatron.data.languages import LANGUAGES
from betterai_megatron.data.preprocess import worker
from betterai_megatron.data.preprocess.config import PreprocessConfig
from betterai_megatron.data.preprocess.mcore_indexed import BackgroundImport
from betterai_megatron.data.preprocess.pool import OrderedPool
from betterai_megatron.data.preprocess.progress import Progress
from betterai_megatron.data.preprocess.readers import iter_batches, plan_inputs
from betterai_megatron.data.preprocess.worker import EncodedBatch, EncodeSettings
from betterai_megatron.data.preprocess.writer import (
    OutputWriter,
    bin_prefix,
    optimal_dtype_name,
)


class StrictModeError(ValueError):
    """``--strict`` met a bad record: ``source``, ``line``, ``reason``."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}:{line}: {reason}" if line else f"{source}: {reason}")
        self.source, self.line, self.reason = source, line, reason


class _Tally:
    """Per-language document and token counts, and the run's totals."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.documents = numpy.zeros(len(LANGUAGES), dtype=numpy.int64)
        self.tokens = numpy.zeros((len(keys), len(LANGUAGES)), dtype=numpy.int64)
        self.empty = 0
        self.filtered: dict[str, int] = {}
        self.input_bytes = 0

    def add(self, result: EncodedBatch) -> int:
        self.documents += numpy.bincount(result.languages, minlength=len(LANGUAGES))
        for k, key_tokens in enumerate(result.keys):
            self.tokens[k] += numpy.bincount(result.languages, weights=key_tokens.document_tokens,
                                             minlength=len(LANGUAGES)).astype(numpy.int64)
        if result.keys:
            self.empty += int((result.keys[0].document_tokens == 0).sum())
        for language, count in result.filtered.items():
            self.filtered[language] = self.filtered.get(language, 0) + count
        self.input_bytes += result.input_bytes
        return int(sum(k.document_tokens.sum() for k in result.keys))

    def languages(self) -> dict:
        table = {}
        for i in numpy.nonzero(self.documents)[0].tolist():
            table[LANGUAGES[i]] = {"id": i, "documents": int(self.documents[i]),
                                   "tokens": {key: int(self.tokens[k, i]) for k, key in enumerate(self.keys)}}
        return table


def _summary(config: PreprocessConfig, files: list[str], tally: _Tally, rejected: int, deaths: int,
             seconds: float, tokenizer) -> dict:
    documents = int(tally.documents.sum())
    tokens = {key: int(tally.tokens[k].sum()) for k, key in enumerate(tally.keys)}
    return {
        "inputs": files,
        "output_prefix": config.output_prefix,
        "outputs": {key: bin_prefix(config.output_prefix, key) for key in tally.keys},
        "tokenizer": {"type": config.tokenizer_type, "model": config.tokenizer_model,
                      "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod},
        "append_eod": config.append_eod,
        "documents": documents,
        "empty_documents": tally.empty,
        "rejected": rejected,
        "filtered_by_language": tally.filtered,
        "tokens": tokens,
        "languages": tally.languages(),
        "input_bytes": tally.input_bytes,
        "seconds": round(seconds, 3),
        "documents_per_s": round(documents / seconds, 1) if seconds else None,
        "tokens_per_s": round(sum(tokens.values()) / seconds, 1) if seconds else None,
        "mb_per_s": round(tally.input_bytes / seconds / 1e6, 3) if seconds else None,
        "worker_deaths": deaths,
    }


def print_summary(summary: dict, stream: TextIO) -> None:
    seconds = summary["seconds"] or 1e-9
    print(f"done: {summary['documents']} documents ({summary['empty_documents']} empty), "
          f"{summary['rejected']} rejected, {sum(summary['filtered_by_language'].values())} filtered by language, "
          f"{summary['input_bytes'] / 1e6:.1f} MB in {seconds:.2f} s "
          f"({summary['documents_per_s']:,.0f} docs/s, {summary['tokens_per_s'] / 1e6:.2f} M tokens/s, "
          f"{summary['mb_per_s']:.2f} MB/s)", file=stream)
    for key, prefix in summary["outputs"].items():
        print(f"  {key}: {summary['tokens'][key]:,} tokens -> {prefix}.bin/.idx", file=stream)
    if summary["languages"]:
        print(f"  {'language':<18}{'documents':>12}{'tokens':>16}", file=stream)
        for name, row in sorted(summary["languages"].items(), key=lambda item: -item[1]["documents"]):
            print(f"  {name:<18}{row['documents']:>12,}{sum(row['tokens'].values()):>16,}", file=stream)
    if summary["rejected"]:
        print(f"  rejected records: {summary['output_prefix']}.rejected.jsonl", file=stream)


def run_preprocess(config: PreprocessConfig, *, fast_import: bool = False, stream: TextIO | None = None) -> dict:
    """Run one preprocessing job and return its summary (also written to ``{prefix}.summary.json``).

    ``fast_import`` loads megatron-core's writer without torch (see ``mcore_indexed``; for a process that only
    preprocesses, such as the CLI). Raises :class:`StrictModeError` in strict mode on the first bad record,
    leaving no output.
    """
    from betterai_megatron.data.tokenizer import build_tokenizer

    stream = stream or sys.stderr
    config.validate()
    start = time.perf_counter()
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    if config.append_eod and (tokenizer.eod is None or tokenizer.eod < 0):
        raise ValueError(f"{config.tokenizer_model} has no end-of-document (eos) token; --append-eod needs one")
    keys = config.output_keys
    dtype = optimal_dtype_name(tokenizer.vocab_size)
    settings = EncodeSettings(
        tokenizer_type=config.tokenizer_type, tokenizer_model=config.tokenizer_model, schema=config.schema,
        json_keys=tuple(config.json_keys), language_key=config.language_key, languages=config.languages,
        append_eod=config.append_eod, dtype=dtype)
    worker.prepare(settings, tokenizer)
    plan = plan_inputs(config)
    importer: list[BackgroundImport] = []
    pool = OrderedPool(
        fn=worker.encode_batch, workers=config.workers, initializer=worker.worker_initializer,
        initargs=(settings,), max_in_flight=config.workers * config.max_in_flight_per_worker,
        max_deaths=config.max_worker_deaths, split=lambda batch: batch.split(),
        merge=lambda batch, parts: EncodedBatch.concat(batch.index, parts, len(keys), dtype),
        on_crash=lambda batch, reason: EncodedBatch.crashed(batch, len(keys), dtype, reason),
        before_restart=lambda: [i.result() for i in importer])
    partitions = config.partitions if not config.keep_sequential_samples else 1
    writer = None
    try:
        pool.start()
        importer.append(BackgroundImport(without_torch=fast_import))  # after the fork, never before
        writer = OutputWriter(output_prefix=config.output_prefix, keys=keys, vocab_size=tokenizer.vocab_size,
                              partitions=partitions, module=importer[0].result, module_ready=importer[0].done)
        live = config.progress if config.progress is not None else stream.isatty()
        progress = Progress(total_bytes=plan.total_bytes, live=live, log_interval=config.log_interval,
                            stream=stream)
        tally = _Tally(keys)
        for result in pool.map_ordered(iter_batches(config, plan)):
            if config.strict and result.rejected:
                raise StrictModeError(*result.rejected[0][:3])
            writer.add(result)
            tokens = tally.add(result)
            progress.update(documents=result.documents, tokens=tokens, input_bytes=result.input_bytes)
        progress.close()
        summary: dict = {}
        writer.finalize(lambda: summary.update(_summary(
            config, plan.files, tally, writer.rejected_count, pool.deaths, time.perf_counter() - start,
            tokenizer)) or summary)
    except BaseException:
        pool.close(cancel=True)
        if writer is not None:
            writer.abort()
        raise
    pool.close()
    print_summary(summary, stream)
    return summary
