"""Train a sentencepiece code tokenizer (BPE or unigram) for megatron-core and tools/preprocess_data.py.

Whitespace and indentation preserved, newlines representable, byte fallback, no dummy prefix, chat / reasoning /
fill-in-the-middle special tokens, deterministic with --seed. See betterai_megatron/data/tokenizer_training.py.

    .venv/bin/python tools/train_tokenizer.py --builtin-corpus --model-prefix tok/code32k --vocab-size 32000
    .venv/bin/python tools/train_tokenizer.py --input stack.parquet --schema the-stack --model-prefix tok/code
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

if __name__ == "__main__":
    from betterai_megatron.data.tokenizer_training import add_arguments, main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
