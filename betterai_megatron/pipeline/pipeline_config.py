"""The ``pipeline`` config section: which stages run and what each stage overrides."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

STAGES = ("data", "tokenizer", "preprocess", "pretrain", "sft", "grpo", "eval")
TRAINING_STAGES = ("pretrain", "sft", "grpo")  # each starts from the previous one's checkpoint (weights only)


@dataclass
class PipelineConfig:
    """``pipeline.*``: which stages run and the per-stage overrides (dotted ``key=value`` strings)."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    nproc: int = 1  # processes per training stage (torchrun --nproc-per-node)
    # OMP_NUM_THREADS of every stage process (null: the environment's; torch then uses one thread per core). Tiny
    # models gain little from intra-op threads and lose much when the cores are shared (oversubscription).
    omp_num_threads: int | None = None
    tokenizer_vocab_size: int = 2048
    preprocess_workers: int = 2
    demo_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    demo_task_repeats: int = 4
    demo_stdlib_max_bytes: int = 1_000_000
    # Dotted overrides for one stage only, applied after the shared sections and the run's own overrides.
    pretrain_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    grpo_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        problems = []
        for stage in self.stages:
            if stage not in STAGES:
                close = difflib.get_close_matches(stage, STAGES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"pipeline.stages: unknown stage {stage!r}{hint}; valid stages, in order: "
                                f"{', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            problems.append(f"pipeline.stages={self.stages} names a stage twice")
        if self.nproc < 1:
            problems.append(f"pipeline.nproc must be >= 1, got {self.nproc}")
        if self.omp_num_threads is not None and self.omp_num_threads < 1:
            problems.append(f"pipeline.omp_num_threads must be >= 1 or null, got {self.omp_num_threads}")
        for name in ("pretrain", "sft", "grpo", "eval"):
            bad = [o for o in getattr(self, f"{name}_overrides") if "=" not in o]
            if bad:
                problems.append(f"pipeline.{name}_overrides: {bad} are not dotted key=value overrides")
        if problems:
            raise ValueError("; ".join(problems))
