"""Host-side checks for the sandbox tests, written independently of the code under test.

``host_processes_with_uids`` reads every ``/proc/<pid>/status`` itself (not via ``process_sweep``), so "no process
left behind" is checked by a separate implementation.
"""

from __future__ import annotations

import os
import time

from betterai_megatron.rewards.languages import CodeJob
from betterai_megatron.rewards.sandbox_config import MAX_WORKERS

# The shared pool's settings (tests/rewards/conftest.py): short timeouts keep the adversarial tests quick.
SHARED_CONFIG = {"workers": 2, "timeout_s": 3.0, "test_case_timeout_s": 1.0, "memory_mb": 1024,
                 "max_output_bytes": 1 << 20}


def pool_uids(config, server_pid: int) -> set[int]:
    """Every host uid a pool server with ``server_pid`` may give its slots (uid_base + (pid mod 2^22) * 256 + slot)."""
    first = config.uid_base + (server_pid % (1 << 22)) * MAX_WORKERS
    return set(range(first, first + MAX_WORKERS))


def host_processes_with_uids(uids: set[int]) -> list[tuple[int, int, str, str]]:
    """(pid, uid, state, name) of every process on the host whose real uid is in ``uids``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        uid = int(fields.get("Uid", "-1").split()[0])
        if uid in uids:
            found.append((int(name), uid, fields.get("State", "").strip(), fields.get("Name", "").strip()))
    return found


def wait_until_no_processes(uids: set[int], timeout_s: float = 3.0) -> list[tuple[int, int, str, str]]:
    """Poll until no process of ``uids`` exists (returns []) or the timeout passes (returns the survivors)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = host_processes_with_uids(uids)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def py_job(program: str, *, tests: str = "def check(candidate):\n    pass\n", entry_point: str = "f",
           test_cases: list[str] | None = None, setup: str = "") -> CodeJob:
    return CodeJob(language="python", program=program, tests=tests, entry_point=entry_point, test_cases=test_cases,
                   setup=setup)


HEALTHY_JOB = py_job("def f(x):\n    return x + 1\n", tests="def check(candidate):\n    assert candidate(1) == 2\n")
