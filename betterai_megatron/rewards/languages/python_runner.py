"""Python: ``python3 -I -S -c <harness>`` with the job as a marshal dict on stdin (see :mod:`.python_harness`).

``-I`` ignores ``PYTHON*`` variables and the user site; ``-S`` skips ``site`` entirely, so programs get the
standard library only (as in a contest judge) and the interpreter starts in about half the time.

The interpreter inside the sandbox is ``sandbox.python_executable``; ``auto`` takes the interpreter running this
process (its base installation, not a virtual environment) when an unprivileged user can execute it, else
``/usr/bin/python3``: bubblewrap runs under the slot's unprivileged uid and cannot bind what that uid cannot
reach (a pyenv build under ``/root``, for instance).
"""

from __future__ import annotations

import functools
import marshal
import os
import shutil
import sys
from pathlib import Path

from betterai_megatron.rewards.languages.base import CodeJob, LanguageRunner, ro_paths_for, world_executable
from betterai_megatron.rewards.sandbox import RunSpec

_HARNESS_PATH = Path(__file__).with_name("python_harness.py")


@functools.lru_cache(maxsize=1)
def harness_source() -> str:
    return _HARNESS_PATH.read_text(encoding="utf-8")


def resolve_python(setting: str, *, isolated: bool) -> str | None:
    """The interpreter path for ``sandbox.python_executable`` (None when nothing usable exists)."""
    if setting != "auto":
        return shutil.which(setting) or (setting if os.path.exists(setting) else None)
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates = [base, "/usr/bin/python3"] if isolated else [sys.executable, base, "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and (not isolated or world_executable(candidate)):
            return os.path.realpath(candidate)
    return None


class PythonRunner(LanguageRunner):
    name = "python"

    @functools.cached_property
    def interpreter(self) -> str | None:
        return resolve_python(self.config.python_executable, isolated=self.isolated)

    def toolchain_problem(self) -> str | None:
        if self.interpreter is None:
            return (f"no Python interpreter for sandbox.python_executable={self.config.python_executable!r} "
                    "(install python3, or point the setting at an interpreter an unprivileged user can run)")
        return None

    def build_spec(self, job: CodeJob, *, nonce: str) -> RunSpec:
        payload = {"nonce": nonce, "setup": job.setup, "program": job.program, "tests": job.tests,
                   "entry_point": job.entry_point, "test_cases": job.test_cases,
                   "case_timeout_s": self.config.test_case_timeout_s}
        interpreter = self.interpreter or "python3"
        return RunSpec(argv=[interpreter, "-I", "-S", "-c", harness_source()],
                       stdin=marshal.dumps(payload, 4),  # builtin in the sandbox; json would import re
                       ro_paths=ro_paths_for(interpreter) if self.isolated else [])
