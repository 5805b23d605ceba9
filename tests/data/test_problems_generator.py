"""The built-in task generator: determinism, graded levels, formulaic level 1, references that pass in the sandbox."""

from __future__ import annotations

import ast
import collections
import re

import pytest

from betterai_megatron.data.problems import read_problems_jsonl
from betterai_megatron.data.problems.generator import (
    count_available,
    generate_problems,
    iter_prompt_solution_pairs,
    main,
)
from betterai_megatron.data.problems.generator_families import FAMILIES
from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.sandbox_config import SandboxConfig


def test_same_seed_same_tasks_and_tests_independent_of_count():
    first = [p.to_dict() for p in generate_problems(60, seed=3)]
    assert first == [p.to_dict() for p in generate_problems(60, seed=3)]
    everything = {p.task_id: p.to_dict() for p in generate_problems(seed=3)}
    assert all(everything[p["task_id"]] == p for p in first)  # a task does not depend on its companions
    other = {p.task_id: p for p in generate_problems(seed=4)}
    changed = [tid for tid, p in everything.items() if p["tests"] != other[tid].tests]
    assert len(changed) > 0.8 * len(everything)  # another seed draws other test arguments


def test_levels_are_balanced_and_bounded():
    problems = generate_problems(100, seed=0)
    counts = collections.Counter(p.level for p in problems)
    assert counts == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20}
    assert {p.difficulty for p in problems if p.level <= 2} == {"easy"}
    assert {p.difficulty for p in problems if p.level >= 4} == {"hard"}
    assert len({p.task_id for p in generate_problems(seed=0)}) == count_available() > 500
    with pytest.raises(ValueError, match="offer"):
        generate_problems(count_available([5]) + 1, levels=[5])
    with pytest.raises(ValueError, match="levels must be in"):
        generate_problems(1, levels=[6])


LEVEL1_PROMPT = re.compile(r'def (add|subtract|multiply_by|return)_(\d+)\((x?)\):\n    """Return (.*)\."""\n')


def test_level_one_is_short_and_formulaic():
    problems = generate_problems(seed=0, levels=[1])
    for problem in problems:
        match = LEVEL1_PROMPT.fullmatch(problem.prompt)
        assert match, problem.prompt
        assert re.fullmatch(r"    return (x [+\-*] )?\d+\n", problem.canonical_solution), problem.canonical_solution
    # Independent check of the semantics: every add_k test says candidate(a) == a + k.
    adds = [p for p in problems if p.entry_point.startswith("add_")]
    assert adds
    for problem in adds:
        k = int(problem.entry_point.split("_")[1])
        for case in problem.test_cases:
            test = ast.parse(case).body[0].test
            argument, expected = ast.literal_eval(test.left.args[0]), ast.literal_eval(test.comparators[0])
            assert expected == argument + k


def test_prompt_solution_pairs_are_whole_functions():
    pairs = list(iter_prompt_solution_pairs(40, seed=1))
    assert len(pairs) == 40
    for prompt, solution in pairs:
        module = ast.parse(prompt + solution)
        assert len(module.body) == 1 and isinstance(module.body[0], ast.FunctionDef)


def test_references_pass_and_wrong_answers_fail_in_the_sandbox():
    # One task of every family, in case mode: every case of the reference passes, "return None" fails them.
    seen, problems = set(), []
    for problem in generate_problems(seed=5):
        family = problem.metadata["family"]
        if family not in seen:
            seen.add(family)
            problems.append(problem)
    assert len(problems) == len(FAMILIES)
    with CodeExecutor(SandboxConfig(workers=2, timeout_s=20.0)) as executor:
        jobs = [executor.job_for(p, p.canonical_solution, mode="cases") for p in problems]
        jobs += [executor.job_for(p, "    return None\n", mode="cases") for p in problems]
        verdicts = executor.run(jobs)
    references, wrong = verdicts[:len(problems)], verdicts[len(problems):]
    for problem, verdict in zip(problems, references):
        assert verdict.status == "passed" and verdict.tests_passed == len(problem.test_cases), (problem, verdict)
    assert all(not v.passed for v in wrong)


def test_command_line_writes_a_problems_file(tmp_path, capsys):
    out = tmp_path / "tasks.jsonl"
    assert main(["--out", str(out), "--count", "12", "--seed", "2", "--levels", "1,2"]) == 0
    problems = read_problems_jsonl(out)
    assert [p.to_dict() for p in problems] == [p.to_dict() for p in generate_problems(12, seed=2, levels=[1, 2])]
    assert main(["--out", str(out), "--count", "100000"]) == 2
    assert "offer" in capsys.readouterr().err
