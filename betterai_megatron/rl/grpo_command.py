"""``betterai grpo --config FILE [section.key=value ...]``: the GRPO stage's entry point (launch it like pretraining:
one process per device under ``torchrun``, or ``examples/grpo.sh``)."""

from __future__ import annotations

import argparse

from betterai_megatron.training.stage_command import add_config_arguments, run_config_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    def run(config):
        from betterai_megatron.rl.grpo_stage import run_grpo  # torch and megatron-core only once the config is valid

        return run_grpo(config)

    return run_config_command("grpo", args, run)
