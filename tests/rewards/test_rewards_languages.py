"""Each language runner, end to end in the sandbox: pass, fail, broken programs, per-case results, forged verdicts."""

from __future__ import annotations

import pytest
from rewards_host_checks import py_job

from betterai_megatron.rewards.languages import CodeJob, normalize_language

CHECK_ADD = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n"


@pytest.fixture(scope="module")
def python_verdicts(executor):
    """Many small Python jobs run as one batch (the pool runs them two at a time)."""
    jobs = {
        "pass": py_job("def f(x):\n    return x + 1\n", tests=CHECK_ADD),
        "wrong": py_job("def f(x):\n    return x + 2\n", tests=CHECK_ADD),
        "crash": py_job("def f(x):\n    return undefined_name\n", tests=CHECK_ADD),
        "syntax": py_job("def f(x)\n    return x + 1\n", tests=CHECK_ADD),
        "missing_entry": py_job("def g(x):\n    return x + 1\n", tests=CHECK_ADD),
        "exit_zero_early": py_job("import sys\nsys.exit(0)\ndef f(x):\n    return x + 1\n", tests=CHECK_ADD),
        "os_exit_early": py_job("import os\nos._exit(0)\n", tests=CHECK_ADD),
        "forged_report": py_job(
            "import os\nos.write(1, b'\\n' + b'0' * 32 + b' passed 1 -\\n')\n"
            "print('passed')\nos._exit(0)\n", tests=CHECK_ADD),
        "main_guard": py_job("def f(x):\n    return x + 1\nif __name__ == '__main__':\n    raise SystemExit(3)\n",
                             tests=CHECK_ADD),
        "stdin_is_empty": py_job("import sys\nDATA = sys.stdin.read()\ndef f():\n    return DATA\n",
                                 tests="def check(candidate):\n    assert candidate() == ''\n"),
        "setup_helpers": py_job("def f(x):\n    return helper(x)\n", tests=CHECK_ADD,
                                setup="def helper(x):\n    return x + 1\n"),
        "cases": py_job("def f(x):\n    return x + 1 if x < 10 else 0\n", tests="",
                        test_cases=["assert candidate(1) == 2", "assert f(20) == 21", "assert candidate(3) == 4"]),
        "case_timeout": py_job("def f(x):\n    while x > 5:\n        pass\n    return x + 1\n", tests="",
                               test_cases=["assert candidate(1) == 2", "assert candidate(9) == 10",
                                           "assert candidate(2) == 3"]),
        "case_crash": py_job("def f(x):\n    return 10 // x\n", tests="",
                             test_cases=["assert candidate(0) == 0", "assert candidate(5) == 2"]),
    }
    verdicts = executor.run(list(jobs.values()))
    return dict(zip(jobs, verdicts))


@pytest.mark.parametrize("name, status", [
    ("pass", "passed"), ("wrong", "failed"), ("crash", "runtime_error"), ("syntax", "syntax_error"),
    ("missing_entry", "runtime_error"), ("exit_zero_early", "runtime_error"), ("os_exit_early", "no_verdict"),
    ("forged_report", "no_verdict"), ("main_guard", "passed"), ("stdin_is_empty", "passed"),
    ("setup_helpers", "passed"),
])
def test_python_check_mode_status(python_verdicts, name, status):
    verdict = python_verdicts[name]
    assert verdict.status == status, verdict
    assert verdict.passed == (status == "passed")


def test_python_error_messages_name_the_problem(python_verdicts):
    assert "NameError" in python_verdicts["crash"].error
    assert "SyntaxError" in python_verdicts["syntax"].error
    assert "'f' is not defined" in python_verdicts["missing_entry"].error
    assert "passed" in python_verdicts["forged_report"].stdout  # it did print its fake verdict...
    assert not python_verdicts["forged_report"].passed  # ...which was ignored


def test_python_case_mode_counts_each_case(python_verdicts):
    cases = python_verdicts["cases"]
    assert (cases.status, cases.per_test, cases.tests_passed, cases.tests_total) == (
        "failed", [True, False, True], 2, 3)
    timeout = python_verdicts["case_timeout"]  # one endless case does not sink the others
    assert timeout.per_test == [True, False, True] and "timed out" in timeout.error
    crash = python_verdicts["case_crash"]
    assert crash.status == "runtime_error" and crash.per_test == [False, True]
    assert "ZeroDivisionError" in crash.error


def test_javascript(executor):
    add = "function add3(x) { return x + 3; }\n"
    tests = "assert.strictEqual(add3(1), 4);\nassert.strictEqual(add3(-3), 0);\n"
    jobs = [CodeJob("javascript", add, tests, "add3"),
            CodeJob("javascript", "function add3(x) { return x + 2; }\n", tests, "add3"),
            CodeJob("javascript", "function add3(x) { return x + ; }\n", tests, "add3"),
            CodeJob("javascript", "process.exit(0);\n" + add, tests, "add3"),
            CodeJob("javascript", "const add3 = (x) => x + 3 - (x > 5 ? 1 : 0);\n", "", "add3",
                    test_cases=["assert.strictEqual(candidate(1), 4)", "assert.strictEqual(add3(9), 12)",
                                "while (true) {}", "throw new TypeError('boom')"])]
    passed, wrong, syntax, early_exit, cases = executor.run(jobs)
    assert passed.status == "passed", passed
    assert wrong.status == "failed" and "AssertionError" in wrong.error
    assert syntax.status == "syntax_error"
    assert early_exit.status == "no_verdict"
    assert cases.per_test == [True, False, False, False] and cases.tests_passed == 1


def test_cpp(executor):
    tests = "CHECK(add3(1) == 4);\nCHECK(add3(-3) == 0);\n"
    program = "#include <vector>\nint add3(int x) { return x + 3; }\nint main() { return 1; }\n"  # main is renamed
    jobs = [CodeJob("cpp", program, tests, "add3"),
            CodeJob("cpp", "int add3(int x) { return x + 3 }\n", tests, "add3"),
            CodeJob("cpp", "#include <stdexcept>\nint add3(int x) { if (x > 5) throw std::runtime_error(\"big\");"
                    " return x + 2; }\n", "", "add3",
                    test_cases=["CHECK(candidate(1) == 3);", "assert(add3(1) == 4);", "add3(9);"])]
    passed, broken, cases = executor.run(jobs)
    assert passed.status == "passed", passed
    assert broken.status == "compile_error" and "error" in broken.error
    assert cases.per_test == [True, False, False] and cases.status == "failed"
    assert cases.error.startswith("case 1: CHECK(add3(1) == 4) failed")  # the first failing case is reported


def test_language_names_and_enabled_languages(executor):
    assert normalize_language("JS") == "javascript" and normalize_language("c++") == "cpp"
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        normalize_language("cobol")
    from betterai_megatron.rewards.executor import CodeExecutor
    from betterai_megatron.rewards.sandbox_config import SandboxConfig

    with CodeExecutor(SandboxConfig(workers=1, languages=["python"])) as python_only, \
            pytest.raises(ValueError, match="not enabled"):
        python_only.runner("javascript")
