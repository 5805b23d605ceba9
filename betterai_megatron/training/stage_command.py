"""What every ``betterai <stage> --config FILE [overrides]`` command shares: arguments, config errors, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from betterai_megatron.config import Config, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 parallel.tp=2")


def run_config_command(name: str, args: argparse.Namespace, runner: Callable[[Config], object]) -> int:
    """Load the config (exit 2 with the message on a ConfigError, also one raised by the stage) and run."""
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai {name}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runner(config)
    except ConfigError as exc:
        print(f"betterai {name}: {exc}", file=sys.stderr)
        return 2
    return 0
