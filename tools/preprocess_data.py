"""Tokenize code corpora into Megatron indexed datasets: a drop-in for Megatron-LM's tools/preprocess_data.py.

Same flags, same output names, byte-identical .bin/.idx; more inputs (jsonl.gz, parquet, `datasets`, source
trees), language selection, bad records skipped and reported instead of a hang. See
``betterai_megatron/data/preprocess/cli.py`` for the flags and exit codes.

    .venv/bin/python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/code32k.model --workers 2 --append-eod
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

if __name__ == "__main__":
    from betterai_megatron.data.preprocess.cli import cli

    sys.exit(cli())
