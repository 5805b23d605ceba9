"""``betterai grpo --config FILE [section.key=value ...]``: the GRPO stage's entry point (launch it like pretraining:
one process per device under ``torchrun``, or ``examples/grpo.sh``)."""

from __future__ import annotations

import argparse
import logging
import sys

from betterai_megatron.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (e.g. examples/configs/tiny_grpo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 rollout.tree.depth=2")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai grpo: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from betterai_megatron.rl.grpo_stage import run_grpo

    try:
        run_grpo(config)
    except ConfigError as exc:
        print(f"betterai grpo: {exc}", file=sys.stderr)
        return 2
    return 0
