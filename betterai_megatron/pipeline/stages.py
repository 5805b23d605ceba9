"""What each pipeline stage runs: its directory under ``run.dir``, its command line, and where it starts from.

Every stage except ``data`` is the project's own CLI command run as a subprocess (under ``torchrun`` for the
stages that build a model), so each starts from a clean process group and is exactly what a user would run by
hand. Stage ``X`` works in ``<run.dir>/X/``:

====================  ===========================================================================================
``data/``             the built-in data (:mod:`.demo_data`): ``pretrain.jsonl``, ``sft.jsonl``, problem splits
``tokenizer/``        ``code.model`` (sentencepiece BPE, ``betterai train-tokenizer``)
``preprocess/``       ``pretrain_text_document.{bin,idx}`` (``betterai preprocess``)
``pretrain/``         ``betterai pretrain`` from scratch; checkpoints in ``pretrain/checkpoints``
``sft/``              ``betterai sft`` from the pretrain checkpoint
``grpo/``             ``betterai grpo`` on ``data/problems_train.jsonl`` from the SFT checkpoint
``eval/``             ``betterai eval``: perplexity on the held-out pretraining split, pass@k on
                      ``data/problems_eval.jsonl``, of the GRPO checkpoint
====================  ===========================================================================================

A training stage starts from the checkpoint of the nearest earlier training stage that this run selects or that
is already complete (``checkpoint.load_dir``, ``checkpoint.load_weights_only=true``: weights only, fresh
optimiser and schedule); its own ``checkpoint.dir`` wins when it holds a checkpoint, so an interrupted stage
resumes where it stopped (:mod:`betterai_megatron.training.checkpointing`). Evaluation reads the last one.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from betterai_megatron.config import Config
from betterai_megatron.pipeline.pipeline_config import STAGES, TRAINING_STAGES, PipelineConfig

MARKER_NAME = "COMPLETE"


@dataclass(frozen=True)
class StagePaths:
    """The layout of a pipeline run directory."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str) -> Path:
        return self.stage(name) / MARKER_NAME

    @property
    def tokenizer_model(self) -> Path:
        return self.root / "tokenizer" / "code.model"

    @property
    def data_prefix(self) -> Path:
        return self.root / "preprocess" / "pretrain"

    @property
    def indexed_prefix(self) -> Path:
        """The ``.bin/.idx`` prefix ``betterai preprocess`` writes for the ``text`` key."""
        return Path(f"{self.data_prefix}_text_document")

    def checkpoints(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"


@dataclass(frozen=True)
class StageCommand:
    """One stage's command: ``betterai <argv...>``; ``overrides`` are the dotted config overrides among them
    (None for stages without a config), checked before the pipeline starts anything."""

    name: str
    argv: list[str]
    overrides: list[str] | None
    distributed: bool  # launched under torchrun with pipeline.nproc processes

    def command_line(self, *, nproc: int) -> list[str]:
        if not self.distributed:
            return [sys.executable, "-m", "betterai_megatron", *self.argv]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "betterai_megatron", *self.argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def previous_training_stage(stage: str, *, selected: list[str], paths: StagePaths) -> str | None:
    """The training stage ``stage`` starts from: the nearest earlier one selected in this run or complete on disk."""
    earlier = [s for s in TRAINING_STAGES if STAGES.index(s) < STAGES.index(stage)]
    for candidate in reversed(earlier):
        if candidate in selected or paths.marker(candidate).exists():
            return candidate
    return None


def stage_commands(config: Config, config_path: str, paths: StagePaths) -> dict[str, StageCommand]:
    """The command of every stage but ``data`` (only what differs between stages is added to the shared config)."""
    p: PipelineConfig = config.pipeline
    data = paths.stage("data")
    tok = str(paths.tokenizer_model)
    # Every model stage reads the pipeline's tokenizer and its pretraining data (eval: held-out perplexity).
    shared = [f"data.tokenizer_model={tok}", "data.tokenizer_type=SentencePieceTokenizer", "data.mock=false",
              f"data.prefixes=[{paths.indexed_prefix}]"]

    def start_from(stage: str) -> list[str]:
        previous = previous_training_stage(stage, selected=p.stages, paths=paths)
        if previous is None:
            return []
        return [f"checkpoint.load_dir={paths.checkpoints(previous)}", "checkpoint.load_weights_only=true"]

    def training(stage: str, extra: list[str]) -> StageCommand:
        overrides = [*shared, f"run.dir={paths.stage(stage)}", f"checkpoint.dir={paths.checkpoints(stage)}",
                     *start_from(stage), *extra, *getattr(p, f"{stage}_overrides")]
        return StageCommand(stage, [stage, "--config", config_path, *overrides], overrides, distributed=True)

    evaluated = previous_training_stage("eval", selected=p.stages, paths=paths)
    eval_overrides = [*shared, f"run.dir={paths.stage('eval')}",
                      *([f"checkpoint.load_dir={paths.checkpoints(evaluated)}"] if evaluated else []),
                      f"eval.problems_path={data / 'problems_eval.jsonl'}", *p.eval_overrides]
    return {
        "tokenizer": StageCommand("tokenizer", [
            "train-tokenizer", "--input", str(data / "pretrain.jsonl"), "--model-prefix", tok.removesuffix(".model"),
            "--vocab-size", str(p.tokenizer_vocab_size), "--model-type", "bpe", "--seed", str(config.train.seed)],
            None, distributed=False),
        "preprocess": StageCommand("preprocess", [
            "preprocess", "--input", str(data / "pretrain.jsonl"), "--output-prefix", str(paths.data_prefix),
            "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
            "--workers", str(p.preprocess_workers), "--append-eod"], None, distributed=False),
        "pretrain": training("pretrain", []),
        # the SFT data is in the reasoning format GRPO and eval prompt with: same template, same system prompt
        "sft": training("sft", [f"data.sft.paths=[{data / 'sft.jsonl'}]", "data.sft.reasoning=true"]),
        "grpo": training("grpo", [f"rollout.problems={data / 'problems_train.jsonl'}"]),
        "eval": StageCommand("eval", ["eval", "--config", config_path, *eval_overrides], eval_overrides,
                             distributed=True),
    }


def write_demo_data(config: Config, paths: StagePaths) -> None:
    """The ``data`` stage (in-process: it is quick and needs no model)."""
    from betterai_megatron.pipeline.demo_data import DemoDataConfig
    from betterai_megatron.pipeline.demo_data import write_demo_data as write

    p: PipelineConfig = config.pipeline
    write(paths.stage("data"), DemoDataConfig(levels=p.demo_levels, task_repeats=p.demo_task_repeats,
                                              stdlib_max_bytes=p.demo_stdlib_max_bytes, seed=config.train.seed))
