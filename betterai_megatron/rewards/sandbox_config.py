"""The ``sandbox`` config section (:class:`SandboxConfig`): limits and choices for running untrusted code.

Every field has a safe default; ``validate()`` names the offending ``sandbox.<key>`` and value. What each limit
enforces, and how, is described in :mod:`betterai_megatron.rewards.sandbox`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

KNOWN_LANGUAGES = ("python", "javascript", "cpp")

# Each pool slot gets its own host uid, so RLIMIT_NPROC counts one program's processes only, and a stray-process
# sweep after a run can target exactly that program. uid = uid_base + (pid % 2**22) * 256 + slot keeps the uids of
# concurrent pools (several trainer ranks on one node) apart; 100e6 + 2**30 stays below 2**31 and far above the
# ranges that distributions hand out to real accounts.
MAX_WORKERS = 256


@dataclass
class SandboxConfig:
    """Limits for one sandboxed program, and the worker pool that runs many of them.

    Attributes:
        allow_unsafe: run *without* isolation when bubblewrap is missing (a loud warning on every pool start).
            Never set this where the code comes from a model you do not control.
        timeout_s: wall-clock limit per program (the whole process tree is killed at this time).
        compile_timeout_s: extra wall-clock time for compiled languages (C++), added to ``timeout_s``.
        test_case_timeout_s: per-test-case limit inside one program (fraction-passed rewards), where the
            language harness can enforce it (Python, JavaScript); the program's ``timeout_s`` always applies.
        memory_mb: address-space limit (RLIMIT_AS) per process.
        max_processes: processes + threads the program may have at once (RLIMIT_NPROC on its own uid).
        max_file_size_mb: largest file the program may write (RLIMIT_FSIZE).
        max_open_files: RLIMIT_NOFILE.
        tmpfs_size_mb: size of the private ``/tmp``, the only writable place.
        max_output_bytes: stdout + stderr captured per program; a program that writes more is killed.
        workers: programs run at once (0: one per CPU core).
        languages: the languages this pool accepts (``python``, ``javascript``, ``cpp``).
        seccomp: install the seccomp filter (needs ``libseccomp.so.2``).
        bwrap_path: the bubblewrap executable.
        python_executable: interpreter inside the sandbox; ``auto`` picks the running interpreter when an
            unprivileged user can read it, else ``/usr/bin/python3``.
        node_executable, cxx_compiler: the JavaScript runtime and C++ compiler inside the sandbox.
        extra_ro_paths: host paths bound read-only into the sandbox (e.g. an interpreter outside ``/usr``).
        uid_base: first host uid of the per-slot unprivileged uids.
    """

    allow_unsafe: bool = False
    timeout_s: float = 10.0
    compile_timeout_s: float = 30.0
    test_case_timeout_s: float = 5.0
    memory_mb: int = 2048
    max_processes: int = 64
    max_file_size_mb: int = 16
    max_open_files: int = 256
    tmpfs_size_mb: int = 64
    max_output_bytes: int = 1 << 20
    workers: int = 0
    languages: list[str] = field(default_factory=lambda: ["python", "javascript", "cpp"])
    seccomp: bool = True
    bwrap_path: str = "bwrap"
    python_executable: str = "auto"
    node_executable: str = "/usr/bin/node"
    cxx_compiler: str = "/usr/bin/g++"
    extra_ro_paths: list[str] = field(default_factory=list)
    uid_base: int = 100_000_000

    def validate(self) -> None:
        """Raise ``ValueError`` naming ``sandbox.<key>`` for the first value out of range."""
        positive = {
            "timeout_s": self.timeout_s,
            "compile_timeout_s": self.compile_timeout_s,
            "test_case_timeout_s": self.test_case_timeout_s,
            "memory_mb": self.memory_mb,
            "max_processes": self.max_processes,
            "max_file_size_mb": self.max_file_size_mb,
            "max_open_files": self.max_open_files,
            "tmpfs_size_mb": self.tmpfs_size_mb,
            "max_output_bytes": self.max_output_bytes,
        }
        for key, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"sandbox.{key} must be a positive number, got {value!r}")
        if not isinstance(self.workers, int) or not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"sandbox.workers must be an integer in [0, {MAX_WORKERS}] (0 = one per core), "
                             f"got {self.workers!r}")
        if not self.languages:
            raise ValueError("sandbox.languages must name at least one language")
        for language in self.languages:
            if language not in KNOWN_LANGUAGES:
                raise ValueError(f"sandbox.languages: unknown language {language!r}; known: {list(KNOWN_LANGUAGES)}")
        if not isinstance(self.uid_base, int) or not 1000 <= self.uid_base <= 1_000_000_000:
            raise ValueError(f"sandbox.uid_base must be an integer in [1000, 1e9], got {self.uid_base!r}")

    @property
    def num_workers(self) -> int:
        """``workers``, with 0 resolved to the number of CPU cores this process may use."""
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)

    def cpu_time_limit_s(self, wall_timeout_s: float) -> int:
        """RLIMIT_CPU for a program with this wall-clock budget: one second of slack, so wall time decides."""
        return math.ceil(wall_timeout_s) + 1
