"""The ``pipeline`` config section: which stages run and what each stage overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("data", "tokenizer", "preprocess", "pretrain", "sft", "grpo", "eval")


@dataclass
class PipelineConfig:
    """``pipeline.*``: which stages run and the per-stage overrides (dotted ``key=value`` strings)."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    nproc: int = 1  # processes per training stage (torchrun --nproc-per-node)
    tokenizer_vocab_size: int = 2048
    preprocess_workers: int = 2
    demo_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    demo_task_repeats: int = 4
    demo_stdlib_max_bytes: int = 1_000_000
    pretrain_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    grpo_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages has unknown stages {unknown}; valid: {list(STAGES)}")
        if self.nproc < 1:
            raise ValueError(f"pipeline.nproc must be >= 1, got {self.nproc}")
