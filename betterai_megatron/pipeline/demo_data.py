"""The built-in data of the full pipeline, made on the spot (no downloads): what a small model can learn on CPU.

From the graded task generator (:mod:`betterai_megatron.data.problems.generator`) and the CPython standard
library (:mod:`betterai_megatron.data.builtin_corpus`) this writes, under one directory:

* ``pretrain.jsonl`` — ``{"text", "lang"}`` documents: every task of the training split written out as a whole
  function (prompt + reference solution), repeated ``task_repeats`` times, plus a slice of stdlib sources so the
  tokenizer and model see real Python;
* ``sft.jsonl`` — chat conversations in the reasoning format the RL stage prompts with: the user asks for the
  function, the assistant answers ``<think>`` what to compute ``</think>`` and one fenced code block holding the
  function's ``def`` line and body;
* ``problems_train.jsonl`` / ``problems_eval.jsonl`` — the task split: GRPO trains on the first, evaluation
  measures pass@k on the held-out second (no task appears in both).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from betterai_megatron.data.builtin_corpus import BuiltinCorpusConfig, write_builtin_corpus
from betterai_megatron.data.chat_template import format_reasoning_response
from betterai_megatron.data.problems.generator import generate_problems
from betterai_megatron.data.problems.jsonl_io import write_problems_jsonl
from betterai_megatron.data.problems.problem import Problem

@dataclass
class DemoDataConfig:
    """``pipeline.data``: sizes of the built-in data."""

    levels: list[int] = None  # task levels used (default: 1, 2, 3)
    eval_fraction: float = 0.15  # of tasks held out for evaluation
    task_repeats: int = 4  # copies of each training task in the pretraining corpus
    stdlib_max_files: int = 150
    stdlib_max_bytes: int = 2_000_000
    seed: int = 0

    def __post_init__(self):
        if self.levels is None:
            self.levels = [1, 2, 3]


def user_message(problem: Problem) -> str:
    """The user turn that asks for ``problem``: the one GRPO rollouts ask with
    (:func:`betterai_megatron.rl.rollout.problem_user_message`), so that SFT data, rollouts and evaluation agree."""
    from betterai_megatron.rl.rollout import problem_user_message  # imports torch: only when asked

    return problem_user_message(problem)


def plan_for(problem: Problem) -> str:
    """The reasoning of the SFT answer: the docstring's first sentence (what to compute), kept short because every
    token of it is generated again in each GRPO rollout and evaluation sample."""
    docstring = problem.prompt.split('"""')[1] if '"""' in problem.prompt else problem.entry_point
    return docstring.strip().splitlines()[0].strip()


def solution_code(problem: Problem) -> str:
    """The code block of the SFT answer: the function's header (anything before it, and its ``def`` line) and the
    reference body, without the docstring the user already wrote. The reward runs ``problem.prompt + code``, so this
    definition replaces the stub."""
    lines = problem.prompt.splitlines()
    header = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), len(lines) - 1)
    return "\n".join(lines[: header + 1]) + "\n" + (problem.canonical_solution or "    pass\n").rstrip("\n")


def split_tasks(config: DemoDataConfig) -> tuple[list[Problem], list[Problem]]:
    problems = generate_problems(None, seed=config.seed, levels=config.levels)
    rng = random.Random(config.seed)
    rng.shuffle(problems)
    held_out = max(1, int(len(problems) * config.eval_fraction))
    return problems[held_out:], problems[:held_out]


def write_demo_data(out_dir: str | Path, config: DemoDataConfig | None = None) -> dict[str, Path]:
    """Write the four files (see module docstring); returns their paths by name."""
    config = config or DemoDataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split_tasks(config)
    paths = {name: out / f"{name}.jsonl" for name in ("pretrain", "sft", "problems_train", "problems_eval")}
    write_problems_jsonl(paths["problems_train"], train)
    write_problems_jsonl(paths["problems_eval"], held_out)
    stdlib = out / "stdlib.jsonl"
    write_builtin_corpus(stdlib, config=BuiltinCorpusConfig(max_files=config.stdlib_max_files,
                                                            max_bytes=config.stdlib_max_bytes))
    rng = random.Random(config.seed + 1)
    documents = [problem.prompt + (problem.canonical_solution or "") for problem in train] * config.task_repeats
    documents += [json.loads(line)["text"] for line in stdlib.read_text().splitlines() if line.strip()]
    rng.shuffle(documents)
    with open(paths["pretrain"], "w") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text, "lang": "python"}) + "\n")
    with open(paths["sft"], "w") as handle:
        for problem in train:
            answer = format_reasoning_response(plan_for(problem), solution_code(problem), language=problem.language)
            messages = [{"role": "user", "content": user_message(problem)},
                        {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    stdlib.unlink()
    return paths
