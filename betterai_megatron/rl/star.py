"""STaR (Self-Taught Reasoner, Zelikman et al. 2022) for code: the ``star`` config section and the pure selection
logic — which sampled answers are kept, the rationalization prompt, and the SFT conversations written.

One STaR iteration (orchestrated by :mod:`betterai_megatron.rl.star_command`, sampled by
:mod:`betterai_megatron.rl.star_sample`):

1. sample ``star.samples_per_problem`` answers per problem with the current model (chat reasoning format);
2. run every answer's code against the problem's tests in the sandbox; keep the passing ones;
3. rationalization (STaR sec. 3.2, ``star.rationalize``): for problems with *no* passing sample, re-prompt with the
   reference solution as a hint; answers that then pass are kept, but trained **without** the hint (the SFT turn is
   the plain user message), so the model learns to produce the rationale as if unaided;
4. fine-tune with the SFT stage on the kept conversations — from the base model each iteration
   (``star.restart_from_base``, as the paper does to avoid overfitting) or from the previous iteration.

Kept answers are rewritten in the canonical reasoning format (:func:`format_reasoning_response` of the parsed
reasoning and code), the exact format the SFT data of the demo uses; with ``star.require_format`` (default) an
answer whose code passes but whose format is broken is not kept, so SFT never teaches a malformed answer.

Records (inputs here) are the per-sample dicts of :func:`betterai_megatron.eval.evaluate.score_completions`:
``{"task_id", "completion", "passed", ...}`` in problem-major order, ``samples_per_problem`` per problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from betterai_megatron.data.chat_template import format_reasoning_response, parse_reasoning_response
from betterai_megatron.data.problems.problem import Problem
from betterai_megatron.pipeline.demo_data import user_message

RATIONALIZATION_HINT = (
    "\n\nHint: this reference solution passes the tests:\n```{language}\n{solution}\n```\n"
    "Work out step by step why it solves the task, then give your own answer in the required format."
)


@dataclass
class StarConfig:
    """``star.*``"""

    iterations: int = 2
    samples_per_problem: int = 4  # k answers sampled per problem each iteration
    dataset: Optional[str] = None  # humaneval | leetcode | generated (as eval.dataset)
    problems_path: Optional[str] = None  # a problems .jsonl (used when dataset is null)
    max_problems: Optional[int] = None
    rationalize: bool = False  # re-prompt unsolved problems with the reference solution as a hint
    temperature: float = 0.8
    max_new_tokens: int = 256
    max_kept_per_problem: Optional[int] = None  # cap on distinct kept answers per problem (null: all)
    require_format: bool = True  # keep only answers in the <think>...</think> + one code block format
    restart_from_base: bool = True  # each iteration fine-tunes the base model (STaR) instead of the last one
    nproc: int = 1  # processes per sampling / SFT subprocess (torchrun --nproc-per-node)
    sft_overrides: list[str] = field(default_factory=list)  # dotted overrides for every SFT run

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"star.iterations={self.iterations} must be >= 1")
        if self.samples_per_problem < 1:
            raise ValueError(f"star.samples_per_problem={self.samples_per_problem} must be >= 1")
        if self.dataset not in (None, "humaneval", "leetcode", "generated"):
            raise ValueError(f"star.dataset={self.dataset!r}: choose humaneval, leetcode or generated")
        if self.max_kept_per_problem is not None and self.max_kept_per_problem < 1:
            raise ValueError(f"star.max_kept_per_problem={self.max_kept_per_problem} must be >= 1 or null")
        if self.temperature < 0:
            raise ValueError(f"star.temperature={self.temperature} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"star.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.nproc < 1:
            raise ValueError(f"star.nproc={self.nproc} must be >= 1")
        bad = [o for o in self.sft_overrides if "=" not in o]
        if bad:
            raise ValueError(f"star.sft_overrides entries must be dotted key=value strings, got {bad}")


def load_star_problems(config: StarConfig) -> list[Problem]:
    """The problems STaR samples on (``star.dataset`` or ``star.problems_path``, first ``star.max_problems``)."""
    from betterai_megatron.eval.evaluate import EvalConfig, load_eval_problems

    return load_eval_problems(EvalConfig(dataset=config.dataset, problems_path=config.problems_path,
                                         max_problems=config.max_problems))


def rationalization_message(problem: Problem) -> str:
    """The user turn that asks for ``problem`` with its reference solution as the hint (STaR rationalization)."""
    if not problem.canonical_solution:
        raise ValueError(f"problem {problem.task_id!r} has no canonical_solution to use as a hint")
    solution = (problem.prompt + problem.canonical_solution).strip("\n")
    return user_message(problem) + RATIONALIZATION_HINT.format(language=problem.language, solution=solution)


def conversation(problem: Problem, assistant: str, *, source: str) -> dict:
    """One SFT record: the plain user turn (never the hint) and the kept answer; ``task_id``/``source`` ride along
    for inspection (the SFT reader ignores keys other than ``messages``)."""
    return {"messages": [{"role": "user", "content": user_message(problem)},
                         {"role": "assistant", "content": assistant}],
            "task_id": problem.task_id, "source": source}


def kept_answer(record: dict, problem: Problem, *, require_format: bool) -> Optional[str]:
    """The SFT answer for one scored sample, or None when it is not kept (failed tests, or broken format)."""
    if not record.get("passed"):
        return None
    parsed = parse_reasoning_response(record["completion"])
    if parsed.format_ok:
        return format_reasoning_response(parsed.reasoning, parsed.code, language=parsed.language or problem.language)
    return None if require_format else record["completion"].strip()


def select_kept(problems: list[Problem], records: list[dict], *, samples_per_problem: int, source: str,
                require_format: bool = True, max_kept_per_problem: Optional[int] = None) -> list[dict]:
    """SFT conversations of the kept samples: passing, (well-formatted,) distinct per problem, at most
    ``max_kept_per_problem`` each; problem-major order as in ``records``. Marks each record's ``kept`` flag."""
    if len(records) != len(problems) * samples_per_problem:
        raise ValueError(f"{len(records)} records for {len(problems)} problems x {samples_per_problem} samples")
    kept = []
    for index, problem in enumerate(problems):
        seen: set[str] = set()
        for record in records[index * samples_per_problem: (index + 1) * samples_per_problem]:
            if record["task_id"] != problem.task_id:
                raise ValueError(f"record for {record['task_id']!r} where {problem.task_id!r} was expected")
            answer = kept_answer(record, problem, require_format=require_format)
            full = max_kept_per_problem is not None and len(seen) >= max_kept_per_problem
            record["kept"] = answer is not None and answer not in seen and not full
            if record["kept"]:
                seen.add(answer)
                kept.append(conversation(problem, answer, source=source))
    return kept


def unsolved_problems(problems: list[Problem], records: list[dict], *, samples_per_problem: int) -> list[Problem]:
    """Problems none of whose samples passed and that have a reference solution (rationalization candidates)."""
    unsolved = []
    for index, problem in enumerate(problems):
        group = records[index * samples_per_problem: (index + 1) * samples_per_problem]
        if not any(r.get("passed") for r in group) and problem.canonical_solution:
            unsolved.append(problem)
    return unsolved


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` one JSON object a line (the file exists, empty, when there are none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def iteration_stats(problems: list[Problem], records: list[dict], kept: list[dict], *, samples_per_problem: int,
                    rationalized: int) -> dict:
    """Per-iteration numbers: sample pass rate, problems solved by sampling, kept conversations by source."""
    passed = sum(1 for r in records if r.get("passed"))
    solved = sum(1 for i in range(len(problems))
                 if any(r.get("passed") for r in records[i * samples_per_problem: (i + 1) * samples_per_problem]))
    return {"problems": len(problems), "samples": len(records), "pass_rate": passed / max(len(records), 1),
            "problems_solved": solved, "rationalization_prompts": rationalized,
            "kept": len(kept), "kept_sampled": sum(1 for c in kept if c["source"] == "sample"),
            "kept_rationalized": sum(1 for c in kept if c["source"] == "rationalization")}
