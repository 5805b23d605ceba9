"""Built-in generator of verifiable Python coding tasks at graded difficulty (levels 1..5), deterministic in a seed.

Every task has a HumanEval-shaped prompt (signature + one-sentence docstring; from level 3 on, one ``>>>``
example), a reference solution (the body), ``check(candidate)`` tests and the same asserts as ``test_cases``.
Expected values are computed by running the reference on the drawn arguments, here, at generation time (trusted
code written in :mod:`.generator_families`).

Determinism: the set and order of tasks depend only on ``seed`` and ``levels``; a task's test arguments depend only
on ``seed`` and its ``task_id`` (a string-seeded :class:`random.Random`, which hashes with SHA-512 and is stable
across processes and Python versions), so a task is the same whichever others are generated with it.

Uses: RL problems that a small model can learn on CPU (``generate_problems``), pretraining/SFT text from the
reference solutions (``iter_prompt_solution_pairs``), and a problems file for ``betterai eval-code``::

    python -m betterai_megatron.data.problems.generator --count 500 --seed 0 --levels 1,2,3 --out tasks.jsonl
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from collections.abc import Iterator, Sequence

from betterai_megatron.data.problems.generator_families import FAMILIES, Family
from betterai_megatron.data.problems.jsonl_io import write_problems_jsonl
from betterai_megatron.data.problems.problem import MAX_LEVEL, Problem, level_to_label

ALL_LEVELS = tuple(range(1, MAX_LEVEL + 1))
_MAX_DRAWS_PER_TEST = 20


def _key(params: dict) -> str:
    return "_".join(str(params[name]) for name in sorted(params)) or "0"


def _call_text(entry: str, args: tuple) -> str:
    return f"{entry}({', '.join(repr(arg) for arg in args)})"


def build_task(family: Family, params: dict, *, seed: int, num_tests: int = 5) -> Problem:
    """One task of ``family`` with parameters ``params`` (test arguments drawn from ``seed`` and the task id)."""
    entry = family.entry.format(**params)
    doc = family.doc.format(**params)
    body = family.body.format(**params) + "\n"
    signature = f"def {entry}({family.params}):\n"
    task_id = f"gen/L{family.level}/{family.name}/{_key(params)}"
    namespace: dict = {}
    exec(signature + body, namespace)  # noqa: S102 - our own reference code, not model output
    reference = namespace[entry]
    rng = random.Random(f"{seed}:{task_id}")
    cases, seen = [], set()
    for _ in range(num_tests * _MAX_DRAWS_PER_TEST):
        args = family.args(rng, params)
        if repr(args) in seen:
            continue
        seen.add(repr(args))
        expected = reference(*copy.deepcopy(args))
        cases.append(f"assert candidate({', '.join(repr(a) for a in args)}) == {expected!r}")
        if len(cases) == num_tests:
            break
    docstring = doc
    if family.level >= 3:
        example = family.args(rng, params)
        docstring += f"\n\n    >>> {_call_text(entry, example)}\n    {reference(*copy.deepcopy(example))!r}\n    "
    prompt = f'{signature}    """{docstring}"""\n'
    tests = "def check(candidate):\n" + "".join(f"    {case}\n" for case in cases)
    return Problem(task_id=task_id, prompt=prompt, tests=tests, entry_point=entry, language="python",
                   difficulty=level_to_label(family.level), level=family.level, canonical_solution=body,
                   test_cases=cases, source="generated", metadata={"family": family.name, "params": dict(params)})


def _catalogue(levels: Sequence[int], rng: random.Random) -> dict[int, list[tuple[Family, dict]]]:
    by_level: dict[int, list[tuple[Family, dict]]] = {}
    for level in levels:
        entries = [(family, dict(params)) for family in FAMILIES if family.level == level for params in family.values]
        rng.shuffle(entries)
        by_level[level] = entries
    return by_level


def count_available(levels: Sequence[int] = ALL_LEVELS) -> int:
    """How many distinct tasks the families offer at ``levels``."""
    return sum(len(family.values) for family in FAMILIES if family.level in set(levels))


def generate_problems(count: int | None = None, *, seed: int = 0, levels: Sequence[int] = ALL_LEVELS,
                      num_tests: int = 5) -> list[Problem]:
    """``count`` distinct tasks (all of them when None), taking the levels in turn so each is equally present.

    Raises ``ValueError`` when ``count`` exceeds :func:`count_available` for ``levels``.
    """
    levels = tuple(dict.fromkeys(levels))
    for level in levels:
        if level not in ALL_LEVELS:
            raise ValueError(f"levels must be in {list(ALL_LEVELS)}, got {level!r}")
    available = count_available(levels)
    if count is None:
        count = available
    if not 0 <= count <= available:
        raise ValueError(f"asked for {count} tasks but levels {list(levels)} offer {available} distinct ones")
    queues = _catalogue(levels, random.Random(seed))
    problems: list[Problem] = []
    while len(problems) < count:
        for level in levels:
            if queues[level] and len(problems) < count:
                family, params = queues[level].pop()
                problems.append(build_task(family, params, seed=seed, num_tests=num_tests))
    return problems


def iter_prompt_solution_pairs(count: int | None = None, *, seed: int = 0,
                               levels: Sequence[int] = ALL_LEVELS) -> Iterator[tuple[str, str]]:
    """(prompt, reference solution) pairs for pretraining/SFT text; ``prompt + solution`` is a whole function."""
    for problem in generate_problems(count, seed=seed, levels=levels):
        yield problem.prompt, problem.canonical_solution or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write generated coding tasks as a problems .jsonl file")
    parser.add_argument("--out", required=True, help="output .jsonl (or .jsonl.gz)")
    parser.add_argument("--count", type=int, default=None, help="number of tasks (default: all available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", default="1,2,3,4,5", help="comma-separated levels in 1..5")
    parser.add_argument("--num-tests", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        levels = [int(level) for level in args.levels.split(",") if level.strip()]
        problems = generate_problems(args.count, seed=args.seed, levels=levels, num_tests=args.num_tests)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_problems_jsonl(args.out, problems)
    print(f"wrote {written} tasks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
