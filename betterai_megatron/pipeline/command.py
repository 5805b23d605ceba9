"""``betterai pipeline --config FILE [overrides]``: every stage from the built-in data to evaluation.

The stages (:mod:`.stages`) run one after another under ``run.dir``; complete ones are skipped, so the same
command resumes an interrupted pipeline (:mod:`.runner`). Overrides given here apply to every stage;
``pipeline.<stage>_overrides`` to one stage. Exit status: 0 done, 1 a stage failed, 2 a config error,
128 + N interrupted by signal N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from betterai_megatron.config import ConfigError, dump_yaml, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (shared sections + a pipeline section)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai pipeline: {exc}", file=sys.stderr)
        return 2
    from betterai_megatron.pipeline.runner import PipelineError, PipelineInterrupted, run_pipeline

    run_dir = Path(config.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Stages read the resolved config (file + overrides) so that they all see the same values.
    resolved = run_dir / "pipeline_config.yaml"
    dump_yaml(config, resolved)
    try:
        run_pipeline(config, str(resolved))
    except ConfigError as exc:
        print(f"betterai pipeline: {exc}", file=sys.stderr)
        return 2
    except PipelineInterrupted as exc:
        print(f"betterai pipeline: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except PipelineError as exc:
        print(f"betterai pipeline: {exc}", file=sys.stderr)
        return 1
    return 0
