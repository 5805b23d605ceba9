"""``betterai sft --config FILE [section.key=value ...]``: supervised fine-tuning on chat data."""

from __future__ import annotations

import argparse

from betterai_megatron.training.stage_command import add_config_arguments, run_config_command

add_arguments = add_config_arguments


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.training.sft import run_sft

    return run_config_command("sft", args, run_sft)
