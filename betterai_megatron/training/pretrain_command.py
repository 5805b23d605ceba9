"""``betterai pretrain --config FILE [section.key=value ...]``: the pretraining stage's entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from betterai_megatron.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 parallel.tp=2")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai pretrain: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from betterai_megatron.training.pretrain import run_pretraining

    try:
        run_pretraining(config)
    except ConfigError as exc:
        print(f"betterai pretrain: {exc}", file=sys.stderr)
        return 2
    return 0
