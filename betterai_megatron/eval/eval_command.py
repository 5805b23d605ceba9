"""``betterai eval --config FILE checkpoint.load_dir=DIR [overrides]``: perplexity and pass@k of a checkpoint."""

from __future__ import annotations

import argparse

from betterai_megatron.training.stage_command import add_config_arguments, run_config_command

add_arguments = add_config_arguments


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.eval.evaluate import run_eval

    return run_config_command("eval", args, run_eval)
