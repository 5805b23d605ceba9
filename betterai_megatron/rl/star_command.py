"""``betterai star --config FILE [overrides]``: STaR bootstrapping — sample, keep passing answers, fine-tune, repeat.

Each of ``star.iterations`` iterations works in ``<run.dir>/iter_<i>/`` and runs two subprocesses (so each starts
from a clean process group, as the pipeline's stages do):

1. sampling — ``torchrun -m betterai_megatron.rl.star_sample`` with ``checkpoint.load_dir`` = the current model
   (:mod:`betterai_megatron.rl.star_sample`), writing ``kept.jsonl``, ``samples.jsonl``, ``stats.json``;
2. fine-tuning — ``torchrun -m betterai_megatron sft`` on ``kept.jsonl``, weights-only from the base model
   (``star.restart_from_base``, STaR's choice) or the previous iteration's, checkpoints in ``iter_<i>/checkpoints``,
   with ``star.sft_overrides`` last. Skipped, with a log line, when nothing was kept: the model stays as it was.

The base model is ``checkpoint.load_dir`` of the config (null: a fresh model from ``train.seed``). An iteration
is marked complete by ``iter_<i>/COMPLETE`` (its stats and the model it produced); a re-run skips complete ones.
Per-iteration numbers go to ``<run.dir>/metrics.jsonl`` (``pass_rate``, ``kept``, ...) and TensorBoard, and a
summary to ``<run.dir>/star_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from betterai_megatron.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (e.g. examples/configs/tiny_star.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. star.iterations=3 star.rationalize=true")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", module, *args]


def sample_command(config: Config, config_path: str, overrides: list[str], *, model_dir: str | None,
                   iteration_dir: Path, iteration: int) -> list[str]:
    load = [f"checkpoint.load_dir={model_dir}"] if model_dir else []
    return _torchrun(config.star.nproc, "betterai_megatron.rl.star_sample",
                     ["--config", config_path, "--output-dir", str(iteration_dir), "--iteration", str(iteration),
                      *overrides, *load])


def sft_command(config: Config, config_path: str, overrides: list[str], *, start_dir: str | None,
                iteration_dir: Path) -> list[str]:
    load = [f"checkpoint.load_dir={start_dir}", "checkpoint.load_weights_only=true"] if start_dir else []
    return _torchrun(config.star.nproc, "betterai_megatron",
                     ["sft", "--config", config_path, *overrides, f"data.sft.paths=[{iteration_dir / 'kept.jsonl'}]",
                      *load, f"checkpoint.dir={iteration_dir / 'checkpoints'}", f"run.dir={iteration_dir / 'sft'}",
                      *config.star.sft_overrides])


def _run(name: str, command: list[str], log_path: Path) -> None:
    print(f"[star] {name}: {shlex.join(command)}", flush=True)
    with open(log_path, "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        tail = "".join(open(log_path).readlines()[-30:])
        raise RuntimeError(f"STaR {name} failed (exit {result.returncode}); log: {log_path}\n{tail}")


def run_star(config: Config, config_path: str, overrides: list[str]) -> list[dict]:
    """All iterations (see the module docstring); returns one stats dict per iteration."""
    from betterai_megatron.training.metrics import MetricsWriter

    try:
        config.star.validate()  # (the lead may move this into config.root.validate_static)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.data.tokenizer_model is None:
        raise ConfigError("data.tokenizer_model is not set (the tokenizer the model was trained with)")
    if not config.star.problems_path and not config.star.dataset:
        raise ConfigError("star: set star.problems_path or star.dataset (the problems to sample on)")
    root = Path(config.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    base = config.checkpoint.load_dir
    current = base
    history = []
    writer = MetricsWriter(root, enabled=True, tensorboard=config.log.tensorboard, total_steps=config.star.iterations)
    try:
        for iteration in range(1, config.star.iterations + 1):
            directory = root / f"iter_{iteration}"
            marker = directory / "COMPLETE"
            if marker.exists():
                done = json.loads(marker.read_text())
                current = done["model"]
                history.append(done["stats"])
                print(f"[star] iteration {iteration}: complete, skipped", flush=True)
                continue
            directory.mkdir(parents=True, exist_ok=True)
            log_path = directory / "star.log"
            _run(f"iteration {iteration} sampling", sample_command(
                config, config_path, overrides, model_dir=current, iteration_dir=directory, iteration=iteration),
                log_path)
            stats = json.loads((directory / "stats.json").read_text())
            if stats["kept"] == 0:
                print(f"[star] iteration {iteration}: no sample passed the tests, nothing to fine-tune on; "
                      f"SFT skipped, the model stays {current or 'the fresh initialisation'}", flush=True)
            else:
                start = base if config.star.restart_from_base else current
                _run(f"iteration {iteration} SFT", sft_command(config, config_path, overrides, start_dir=start,
                                                               iteration_dir=directory), log_path)
                current = str(directory / "checkpoints")
            stats = {"iteration": iteration, **stats, "sft_skipped": stats["kept"] == 0, "model": current}
            history.append(stats)
            writer.log({"step": iteration, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}})
            marker.write_text(json.dumps({"stats": stats, "model": current}) + "\n")
            print(f"[star] iteration {iteration}: pass rate {stats['pass_rate']:.3f}, solved "
                  f"{stats['problems_solved']}/{stats['problems']}, kept {stats['kept']} "
                  f"({stats['kept_rationalized']} rationalized)", flush=True)
    finally:
        writer.close()
    (root / "star_summary.json").write_text(json.dumps({"iterations": history, "final_model": current}, indent=2))
    return history


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai star: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_star(config, args.config, list(args.overrides))
    except ConfigError as exc:
        print(f"betterai star: {exc}", file=sys.stderr)
        return 2
    return 0
