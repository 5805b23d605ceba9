"""The worker pool: bounded concurrency, recovery from a dead server, refusal without bubblewrap, config checks."""

from __future__ import annotations

import os
import signal
import time

import pytest
from rewards_host_checks import HEALTHY_JOB, pool_uids, py_job, wait_until_no_processes

from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.sandbox import SandboxUnavailableError
from betterai_megatron.rewards.sandbox_config import SandboxConfig
from betterai_megatron.rewards.verdict import parse_report, strip_report
from betterai_megatron.rewards.worker_pool import SandboxServerError


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_at_most_workers_programs_run_at_once(executor):
    # Each program reports when it ran (the sandbox shares the host's clock); with 2 workers and 4 programs,
    # exactly two run at once -- judged from the programs' own timestamps, not from a load-sensitive wall time.
    program = ("import time\nSTART = time.time()\ntime.sleep(1.5)\nprint('RAN', START, time.time())\n"
               "def f(x):\n    return x + 1\n")
    verdicts = executor.run([py_job(program, tests=HEALTHY_JOB.tests) for _ in range(4)])
    assert [v.status for v in verdicts] == ["passed"] * 4
    intervals = []
    for verdict in verdicts:
        _, start, end = verdict.stdout.split()
        intervals.append((float(start), float(end)))
    assert _max_overlap(intervals) == executor.config.workers == 2


def test_a_dead_server_fails_its_jobs_and_is_restarted():
    config = SandboxConfig(workers=1, timeout_s=20.0)
    with CodeExecutor(config) as executor:
        old_pid = executor.pool.server_pid
        old_uids = pool_uids(config, old_pid)
        future = executor.pool.submit(executor.runner("python").build_spec(
            py_job("import time\ntime.sleep(30)\n"), nonce="0" * 32))
        time.sleep(0.5)
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(SandboxServerError):
            future.result(timeout=10)
        assert wait_until_no_processes(old_uids) == []  # its program died with it (setpriv --pdeathsig)
        verdict = executor.run([HEALTHY_JOB])[0]
        assert verdict.status == "passed"
        assert executor.pool.server_starts == 2 and executor.pool.server_pid != old_pid


def test_refuses_to_run_without_bubblewrap():
    with pytest.raises(SandboxUnavailableError, match="allow_unsafe"):
        CodeExecutor(SandboxConfig(workers=1, bwrap_path="/nonexistent/bwrap"))


def test_allow_unsafe_runs_unisolated_and_says_so(capfd):
    with CodeExecutor(SandboxConfig(workers=1, bwrap_path="/nonexistent/bwrap", allow_unsafe=True)) as executor:
        assert executor.isolated is False
        assert executor.run([HEALTHY_JOB])[0].status == "passed"
    assert "UNSAFE" in capfd.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("timeout_s", 0, "sandbox.timeout_s"), ("memory_mb", -1, "sandbox.memory_mb"),
    ("workers", 1000, "sandbox.workers"), ("languages", ["python", "rust"], "unknown language 'rust'"),
    ("languages", [], "sandbox.languages"),
])
def test_config_errors_name_the_key(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SandboxConfig(**{field: value}).validate()


def test_report_line_protocol():
    nonce = "ab" * 16
    error_hex = b"AssertionError: x".hex()
    stdout = f"noise\n{'cd' * 16} passed 1 -\nmore\n{nonce} failed 101 {error_hex}\n".encode()
    assert parse_report(stdout, nonce) == {"status": "failed", "passed": [True, False, True],
                                           "error": "AssertionError: x"}
    assert parse_report(stdout, "ef" * 16) is None  # nobody else's nonce counts
    assert parse_report(f"\n{nonce} passed 1 zz\n".encode(), nonce) is None  # bad hex
    assert parse_report(f"\n{nonce} exploded 1 -\n".encode(), nonce) is None  # unknown status
    assert strip_report(stdout, nonce) == f"noise\n{'cd' * 16} passed 1 -\nmore\n".encode()
