"""One interface for every language: a :class:`CodeJob` becomes a sandbox :class:`RunSpec`, a run a :class:`Verdict`.

A *job* is a complete program plus its tests, in one language:

``program``      the code under test (for HumanEval-style problems: prompt + completion, see ``assemble_program``).
``tests``        check mode: code that defines the test (Python: ``def check(candidate)``, called with the entry
                 point; JavaScript/C++: statements that throw on failure). Case mode: a prelude of test helpers.
``test_cases``   None for check mode (one test); otherwise independent snippets, each one test, so a reward can be
                 the fraction passed. ``candidate`` names the entry point in Python and JavaScript cases.
``setup``        trusted definitions run before the program (e.g. LeetCode's ``ListNode``/``TreeNode``).

Runners (:mod:`.python_runner`, :mod:`.javascript_runner`, :mod:`.cpp_runner`) implement :meth:`build_spec` and
may refine how a run without a report is labelled (:meth:`label_without_report`).
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass

from betterai_megatron.rewards.sandbox import RawRun, RunSpec
from betterai_megatron.rewards.sandbox_config import SandboxConfig
from betterai_megatron.rewards.verdict import Verdict, parse_report, strip_report, verdict_from_report

_KEEP_OUTPUT_CHARS = 4000


@dataclass
class CodeJob:
    language: str
    program: str
    tests: str
    entry_point: str
    test_cases: list[str] | None = None
    setup: str = ""

    @property
    def num_tests(self) -> int:
        return len(self.test_cases) if self.test_cases is not None else 1


class LanguageRunner(ABC):
    """Builds the sandboxed command for a job and interprets what came back."""

    name: str = ""

    def __init__(self, config: SandboxConfig, *, isolated: bool) -> None:
        self.config = config
        self.isolated = isolated

    @abstractmethod
    def build_spec(self, job: CodeJob, *, nonce: str) -> RunSpec:
        """The program to run for ``job``; its harness must print the started marker and the nonce report."""

    @abstractmethod
    def toolchain_problem(self) -> str | None:
        """Why this language cannot run here (a missing interpreter or compiler), or None when it can."""

    def assemble_program(self, prompt: str, completion: str, entry_point: str) -> str:
        """The program for a HumanEval-style sample: the prompt continued by the completion."""
        return prompt + completion

    def label_without_report(self, raw: RawRun) -> tuple[str, str]:
        """(status, error) for a run that started but printed no valid report (early exit, crash, limit)."""
        stderr = raw.stderr.decode("utf-8", errors="replace")
        if "MemoryError" in stderr or "bad_alloc" in stderr or "heap out of memory" in stderr:
            return "memory_limit", _last_line(stderr)
        code = raw.exit_code
        detail = f"exited with code {code}" if code is None or code >= 0 else f"killed by signal {-code}"
        return "no_verdict", f"{detail} before reporting a result" + (f": {_last_line(stderr)}" if stderr else "")

    def verdict(self, raw: RawRun, job: CodeJob, *, nonce: str) -> Verdict:
        """Interpret one run: the report if there is one, else the limit that stopped the program."""
        report = parse_report(raw.program_stdout, nonce)
        if report is not None:
            verdict = verdict_from_report(report, num_tests=job.num_tests)
        else:
            if raw.output_exceeded:
                status, error = "output_limit", f"wrote more than {self.config.max_output_bytes} bytes"
            elif raw.timed_out:
                status, error = "timeout", "timed out"
            elif not raw.started:
                status, error = "sandbox_error", _last_line(raw.stderr.decode("utf-8", errors="replace"))
            else:
                status, error = self.label_without_report(raw)
            verdict = Verdict(status=status, tests_total=job.num_tests, per_test=[False] * job.num_tests,
                              error=error)
        verdict.exit_code = raw.exit_code
        verdict.wall_s = raw.wall_s
        program_output = strip_report(raw.program_stdout, nonce)
        verdict.stdout = program_output[:_KEEP_OUTPUT_CHARS].decode("utf-8", errors="replace")
        verdict.stderr = raw.stderr[-_KEEP_OUTPUT_CHARS:].decode("utf-8", errors="replace")
        return verdict


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:2000] if lines else ""


def world_executable(path: str) -> bool:
    """True when an unprivileged user can reach and execute ``path`` (every parent directory searchable)."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return False
    if not (mode & stat.S_IXOTH and mode & stat.S_IROTH):
        return False
    parent = os.path.dirname(real)
    while True:
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def ro_paths_for(executable: str) -> list[str]:
    """Host paths the sandbox must bind read-only for ``executable`` to run (its prefix, when outside /usr)."""
    real = os.path.realpath(executable)
    if real.startswith("/usr/"):
        return []
    return [os.path.dirname(os.path.dirname(real))]  # <prefix>/bin/<exe> -> <prefix>
