"""Preprocessing code corpora into Megatron indexed datasets (``.bin/.idx``), a faster drop-in for
Megatron-LM's ``tools/preprocess_data.py`` that keeps every good document.

Modules: ``config`` (:class:`PreprocessConfig`), ``readers`` (jsonl/jsonl.gz/parquet/`datasets`/source trees),
``schemas`` (field mapping per corpus), ``worker`` (parse, validate, tokenize a batch), ``pool`` (ordered process
pool that survives dying workers), ``writer`` (megatron-core ``IndexedDatasetBuilder``, atomic outputs, language
sidecars), ``mcore_indexed`` (fast import of the writer), ``progress``, ``run`` (:func:`run_preprocess`), ``cli``.

Importing this package is cheap (no torch, no megatron-core); the heavy imports happen inside a run.
"""

from betterai_megatron.data.preprocess.config import SCHEMAS, PreprocessConfig


def run_preprocess(config: PreprocessConfig, **kwargs) -> dict:
    """See :func:`betterai_megatron.data.preprocess.run.run_preprocess`."""
    from betterai_megatron.data.preprocess.run import run_preprocess as _run

    return _run(config, **kwargs)


__all__ = ["SCHEMAS", "PreprocessConfig", "run_preprocess"]
