"""Command line of the preprocessor: Megatron-LM's ``tools/preprocess_data.py`` flags plus ours.

Owns :func:`add_arguments` and :func:`main` (the ``betterai preprocess`` sub-command and
``tools/preprocess_data.py``). Megatron-LM flags keep their meaning (``--input --output-prefix --json-keys
--tokenizer-type --tokenizer-model --workers --append-eod --log-interval --partitions
--keep-sequential-samples``); Megatron-LM flags this tool does not implement fail with a clear message instead
of being silently ignored (``--split-sentences``: NLTK sentence splitting is for BERT-style prose;
``--find-optimal-num-workers``; legacy sentencepiece special tokens; vocab/merge files).

Exit codes: 0 done (bad records skipped and reported); 2 usage error, unreadable input, or ``--strict`` on a
bad record (no output written); 1 the run failed (workers kept dying, internal error; no output written);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from betterai_megatron.data.languages import parse_language_list
from betterai_megatron.data.preprocess.config import SCHEMAS, PreprocessConfig

_UNSUPPORTED = {
    "split_sentences": "--split-sentences (NLTK sentence splitting) is not supported: code is not split into "
                       "sentences; pass pre-split text as a JSON list of strings instead",
    "find_optimal_num_workers": "--find-optimal-num-workers is not supported; throughput is printed per run",
    "vocab_file": "--vocab-file is not supported: give a sentencepiece .model or a HuggingFace tokenizer "
                  "directory with --tokenizer-model",
    "merge_file": "--merge-file is not supported: give a HuggingFace tokenizer directory with --tokenizer-model",
    "tokenizer_special_tokens": "--tokenizer-special-tokens (legacy sentencepiece wrapper) is not supported: "
                                "put special tokens into the model with tools/train_tokenizer.py",
    "tokenizer_sentencepiece_legacy": "--tokenizer-sentencepiece-legacy is not supported",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                       choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"])
    group.add_argument("--tokenizer-model", required=True,
                       help="sentencepiece .model file, or a local HuggingFace tokenizer directory")
    for flag in ("--vocab-file", "--merge-file"):
        group.add_argument(flag, default=None, help=argparse.SUPPRESS)
    group.add_argument("--tokenizer-special-tokens", nargs="+", default=None, help=argparse.SUPPRESS)
    group.add_argument("--tokenizer-sentencepiece-legacy", action="store_true", help=argparse.SUPPRESS)

    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", default=[],
                       help="jsonl, jsonl.gz or parquet files (globs allowed), read in the order given")
    group.add_argument("--input-dir", default=None,
                       help="a source tree: one document per file, language from the file extension")
    group.add_argument("--hf-dataset", default=None, help="a `datasets` name or a local dataset directory")
    group.add_argument("--hf-split", default="train")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON record (raw schema)")
    group.add_argument("--schema", default="raw", choices=SCHEMAS,
                       help="field mapping: raw (--json-keys), the-stack (content, lang), magicoder "
                            "(problem, solution, lang), code-feedback (messages), codeultrafeedback "
                            "(instruction, best-rated response)")
    group.add_argument("--language-key", default="lang", help="record field with the language (raw schema)")
    group.add_argument("--languages", default=None,
                       help="comma-separated languages to keep (e.g. python,javascript); others are dropped")
    group.add_argument("--max-file-bytes", type=int, default=1 << 20,
                       help="--input-dir: larger files are rejected (default 1 MiB)")
    group.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--keep-newlines", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--lang", default="english", help=argparse.SUPPRESS)  # NLTK's, only with --split-sentences

    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the eod token to each document")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx, .lang.npy, .languages.json, "
                            "{prefix}.rejected.jsonl, {prefix}.summary.json")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="Megatron-LM's partitions; only the output order is reproduced (round-robin)")
    group.add_argument("--keep-sequential-samples", action="store_true")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress log lines")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad record with exit code 2 and write nothing")
    group.add_argument("--batch-bytes", type=int, default=1 << 20, help="input bytes per worker task")
    group.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="live progress bar (default: when stderr is a terminal)")
    group.add_argument("--no-progress", dest="progress", action="store_false")
    group.add_argument("--find-optimal-num-workers", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--workers-to-check", nargs="+", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--max-documents", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Validated :class:`PreprocessConfig` from parsed arguments; ValueError names the offending flag."""
    for name, message in _UNSUPPORTED.items():
        if getattr(args, name, None):
            raise ValueError(message)
    config = PreprocessConfig(
        output_prefix=args.output_prefix, inputs=list(args.input), input_dir=args.input_dir,
        hf_dataset=args.hf_dataset, hf_split=args.hf_split, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, json_keys=tuple(args.json_keys), schema=args.schema,
        language_key=args.language_key, languages=parse_language_list(args.languages),
        append_eod=args.append_eod, workers=args.workers, partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples, log_interval=args.log_interval,
        strict=args.strict, batch_bytes=args.batch_bytes, max_file_bytes=args.max_file_bytes,
        progress=args.progress)
    config.validate()
    return config


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.data.preprocess.pool import WorkerDeathError, WorkerError
    from betterai_megatron.data.preprocess.readers import InputError
    from betterai_megatron.data.preprocess.run import StrictModeError, run_preprocess

    try:
        config = config_from_args(args)
        run_preprocess(config, fast_import=True)
    except StrictModeError as error:
        print(f"error (--strict): {error}; nothing was written", file=sys.stderr)
        return 2
    except (InputError, ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (WorkerDeathError, WorkerError) as error:
        cause = f"\n{error.__cause__!r}" if error.__cause__ is not None else ""
        print(f"error: {error}{cause}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``tools/preprocess_data.py`` entry point."""
    parser = argparse.ArgumentParser(description="Tokenize code corpora into Megatron .bin/.idx files.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
