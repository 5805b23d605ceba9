"""``betterai pretrain --config FILE [section.key=value ...]``: the pretraining stage's entry point."""

from __future__ import annotations

import argparse

from betterai_megatron.training.stage_command import add_config_arguments, run_config_command

add_arguments = add_config_arguments


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.training.pretrain import run_pretraining

    return run_config_command("pretrain", args, run_pretraining)
