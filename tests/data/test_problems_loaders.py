"""HumanEval and LeetCode loaders: counts, labels, test construction, and real runs of their tests in the sandbox."""

from __future__ import annotations

import ast
import collections

import pytest

from betterai_megatron.data.problems.humaneval import load_humaneval, split_check_asserts
from betterai_megatron.data.problems.leetcode import load_leetcode
from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.sandbox_config import SandboxConfig


@pytest.fixture(scope="module")
def executor():
    with CodeExecutor(SandboxConfig(workers=2, timeout_s=20.0, test_case_timeout_s=5.0)) as shared:
        yield shared


@pytest.fixture(scope="module")
def humaneval():
    return {p.task_id: p for p in load_humaneval()}


@pytest.fixture(scope="module")
def leetcode():
    return {p.task_id: p for p in load_leetcode()}


def test_humaneval_problems(humaneval):
    assert len(humaneval) == 164
    first = humaneval["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and first.canonical_solution and first.source == "humaneval"
    assert (first.difficulty, first.level) == ("unknown", 0)
    assert sum(p.test_cases is not None for p in humaneval.values()) == 157
    assert first.test_cases[0] == "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    assert len(first.test_cases) == 7
    assert humaneval["HumanEval/32"].test_cases is None  # its check() has loops: kept whole


def test_split_check_asserts():
    source = "X = 1\n\ndef check(candidate):\n    '''doc'''\n    assert candidate(1) == 2\n    assert candidate(\n        3) == 4\n"
    assert split_check_asserts(source) == ["assert candidate(1) == 2", "assert candidate(\n    3) == 4"]
    assert split_check_asserts("def check(candidate):\n    for i in range(3):\n        assert candidate(i)\n") is None


def test_humaneval_cases_give_a_fraction(executor, humaneval):
    problem = humaneval["HumanEval/0"]
    right, always_true = executor.run([executor.job_for(problem, problem.canonical_solution, mode="cases"),
                                       executor.job_for(problem, "    return True\n", mode="cases")])
    assert right.status == "passed" and right.tests_passed == 7
    # HumanEval/0 expects True in cases 1, 3, 5, 6 (written out in its test): 4 of 7 pass.
    assert always_true.per_test == [True, False, True, False, True, True, False]


def test_leetcode_problems(leetcode):
    assert len(leetcode) == 1405
    labels = collections.Counter(p.difficulty for p in leetcode.values())
    assert labels == {"easy": 309, "medium": 820, "hard": 276}
    assert {p.level for p in leetcode.values()} == {2, 3, 4}
    assert all(p.canonical_solution is None and p.test_cases for p in leetcode.values())
    assert sum(len(p.test_cases) for p in leetcode.values()) > 25_000
    # Generated test modules and prompt stubs are valid Python (every 3rd / 25th problem: parsing all 1,405 test
    # modules costs seconds of CPU; the template is shared and the per-problem parts vary across the sample).
    for problem in list(leetcode.values())[::3]:
        compile(problem.tests, problem.task_id, "exec", flags=ast.PyCF_ONLY_AST)
    for problem in list(leetcode.values())[::25]:
        compile(problem.prompt + "        pass\n", problem.task_id, "exec", flags=ast.PyCF_ONLY_AST)
    tree = leetcode["leetcode/104-maximum_depth_of_binary_tree"]
    assert "class TreeNode" in tree.setup_code and "graphviz" not in tree.setup_code
    assert tree.prompt.rstrip().endswith("def max_depth(self, root: TreeNode[int] | None) -> int:")


SOLUTIONS = {
    "leetcode/258-add_digits": "        if num == 0:\n            return 0\n        return 1 + (num - 1) % 9\n",
    "leetcode/1-two_sum": ("        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                           "                return [seen[target - x], i]\n            seen[x] = i\n        return []\n"),
    "leetcode/104-maximum_depth_of_binary_tree": (
        "        if root is None:\n            return 0\n"
        "        return 1 + max(self.max_depth(root.left), self.max_depth(root.right))\n"),
    "leetcode/206-reverse_linked_list": (
        "        previous = None\n        while head:\n            head.next, previous, head = previous, head, head.next\n"
        "        return previous\n"),
    "leetcode/146-lru_cache": (
        "        import collections\n        self.capacity = capacity\n        self.items = collections.OrderedDict()\n\n"
        "    def get(self, key: int) -> int:\n        if key not in self.items:\n            return -1\n"
        "        self.items.move_to_end(key)\n        return self.items[key]\n\n"
        "    def put(self, key: int, value: int) -> None:\n        self.items[key] = value\n"
        "        self.items.move_to_end(key)\n        if len(self.items) > self.capacity:\n"
        "            self.items.popitem(last=False)\n"),
}


def test_leetcode_tests_run_in_the_sandbox(executor, leetcode):
    ids = list(SOLUTIONS)
    jobs = [executor.job_for(leetcode[i], SOLUTIONS[i], mode="cases") for i in ids]
    jobs += [executor.job_for(leetcode[i], SOLUTIONS[i], mode="check") for i in ids]
    jobs.append(executor.job_for(leetcode["leetcode/258-add_digits"], "        return 0\n", mode="cases"))
    verdicts = executor.run(jobs)
    for task_id, verdict in zip(ids + ids, verdicts[:-1]):
        assert verdict.status == "passed", (task_id, verdict)
    assert [v.tests_total for v in verdicts[:len(ids)]] == [len(leetcode[i].test_cases) for i in ids]
    stub = verdicts[-1]  # only (0, 0) of add_digits' 17 cases expects 0
    assert (stub.status, stub.tests_passed, stub.tests_total) == ("failed", 1, 17)
