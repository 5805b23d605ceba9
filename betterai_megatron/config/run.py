"""Run-level sections: ``run.*`` (where outputs go) and ``log.*`` (how progress is reported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "betterai"


@dataclass
class LogConfig:
    interval: int = 1  # steps between console lines / metrics.jsonl records
    tensorboard: bool = True
    level: str = "INFO"
