"""``betterai eval-code`` end to end: HumanEval canonical / wrong / hostile completions, results file, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from betterai_megatron.data.problems import write_problems_jsonl
from betterai_megatron.data.problems.generator import generate_problems
from betterai_megatron.data.problems.humaneval import load_humaneval


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "betterai_megatron", "eval-code", *args], capture_output=True,
                          text=True, timeout=600, check=False)


def _write_samples(path: Path, samples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_humaneval_canonical_pass_164_of_164_and_returning_none_passes_0(tmp_path, humaneval):
    # Two samples per problem, in one run: the canonical solution and a completion that returns None.
    samples = []
    for problem in humaneval:
        samples.append({"task_id": problem.task_id, "completion": problem.canonical_solution, "kind": "canonical"})
        samples.append({"task_id": problem.task_id, "completion": "    return None\n", "kind": "none"})
    path = _write_samples(tmp_path / "samples.jsonl", samples)
    # A generous timeout: this box may be loaded, and a slow start must not look like a wrong answer.
    done = _run_cli("--dataset", "humaneval", "--samples", str(path), "--workers", "2", "--k", "1,2,10",
                    "--timeout", "20")
    assert done.returncode == 0, done.stderr
    # n = 2, c = 1 for every problem: pass@1 = 0.5, pass@2 = 1; no pass@10 (fewer than 10 samples).
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pass@1": 0.5, "pass@2": 1.0}
    results = [json.loads(line) for line in Path(f"{path}_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["kind"]) for r in results] == [(s["task_id"], s["kind"]) for s in samples]
    canonical = [r for r in results if r["kind"] == "canonical"]
    nones = [r for r in results if r["kind"] == "none"]
    assert sum(r["passed"] for r in canonical) == 164 and all(r["result"] == "passed" for r in canonical)
    assert sum(r["passed"] for r in nones) == 0


def test_hostile_completions_are_contained(tmp_path):
    problems = generate_problems(2, seed=0, levels=[1])
    problem_file = tmp_path / "problems.jsonl"
    write_problems_jsonl(problem_file, problems)
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    os.chmod(tmp_path, 0o777)
    os.chmod(victim, 0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    hostile = [
        "    import os\n    while True:\n        os.fork()\n",
        f"    open({str(victim)!r}, 'w').write('pwned')\n    return x\n",
        f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return x\n",
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os.kill(-1, signal.SIGKILL)\n",
        "    print('x' * 10_000_000)\n",
    ]
    samples = [{"task_id": problems[0].task_id, "completion": c} for c in hostile]
    samples += [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems]
    path = _write_samples(tmp_path / "hostile.jsonl", samples)
    try:
        done = _run_cli("--dataset", str(problem_file), "--samples", str(path), "--workers", "2", "--timeout", "2",
                        "--k", "1")
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in Path(f"{path}_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [False] * len(hostile) + [True, True]
    statuses = [r["status"] for r in results[:len(hostile)]]
    # The fork bomb meets RLIMIT_NPROC (BlockingIOError) or the clock; the host file does not exist inside; the
    # connection is refused by seccomp; kill(-1) finds no process it may signal.
    assert statuses[0] == "timeout" or "BlockingIOError" in results[0]["result"]
    assert statuses[1:] == ["runtime_error", "runtime_error", "runtime_error", "output_limit"]
    assert "FileNotFoundError" in results[1]["result"]
    assert "PermissionError" in results[2]["result"]
    assert "ProcessLookupError" in results[3]["result"]
    assert victim.read_text() == "original"
    # Problem 0 passed once in 6 samples, problem 1 once in 1: mean pass@1 = (1/6 + 1) / 2.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pass@1": pytest.approx((1 / 6 + 1) / 2)}


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "HumanEval/0"}', "bad.jsonl:2: missing key 'completion'"),
    ('{"task_id": "HumanEval/9999", "completion": ""}', "bad.jsonl:2: unknown task_id 'HumanEval/9999'"),
    ('{"task_id": "HumanEval/0", "completion": ', "bad.jsonl:2: malformed JSON"),
])
def test_bad_samples_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n' + line + "\n")
    done = _run_cli("--dataset", "humaneval", "--samples", str(path), "--workers", "1")
    assert done.returncode == 2
    assert message in done.stderr


def test_unknown_dataset_and_bad_override(tmp_path):
    samples = _write_samples(tmp_path / "s.jsonl", [])
    done = _run_cli("--dataset", "nope", "--samples", str(samples))
    assert done.returncode == 2 and "unknown problem set 'nope'" in done.stderr
    done = _run_cli("--dataset", "humaneval", "--samples", str(samples), "sandbox.memroy_mb=5")
    assert done.returncode == 2 and "memory_mb" in done.stderr
