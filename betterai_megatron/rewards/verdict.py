"""What running a program against its tests produced (:class:`Verdict`), and the report line protocol.

Every language harness ends a run by writing one line to stdout::

    <nonce> <status> <per-test bits> <error as UTF-8 hex, or ->
    e.g.  5f0c...9a failed 110 63617365...

(hex and bits rather than JSON so that no harness needs a JSON library: in Python, importing ``json`` costs more
start-up time than the interpreter itself).

The nonce is 32 random hex digits handed to the harness on stdin, read before any untrusted code runs and never
written to a file or an argument. A program that prints a fake "passed" line, exits early with status 0
(``sys.exit(0)`` / ``os._exit(0)`` before the tests run, the classic reward hack) or crashes therefore gets no
verdict (``no_verdict``), which is a failure. This defeats naive forgery, not a program that deliberately
introspects the harness's memory (the untrusted code and the harness share one process, as they must for the
tests to call its functions); the *sandbox* is the security boundary, the nonce only keeps the reward honest.
For the same reason the tests are only as strict as they are written: a program that returns an object comparing
equal to everything, or patches builtins the tests use, can pass ``assert candidate(x) == y`` tests. Watch the
rate of suspicious passes (e.g. a jump in pass rate without longer solutions) when training on such tests.

Status labels (:data:`STATUSES`), most specific first:

``passed``          every test passed.
``failed``          a test's assertion failed (wrong answer).
``runtime_error``   an exception other than an assertion, in the program or in a test.
``syntax_error``    the program does not parse (Python, JavaScript).
``compile_error``   the program does not compile (C++).
``timeout``         the wall-clock limit killed it.
``memory_limit``    it ran out of address space (MemoryError / bad_alloc).
``output_limit``    it wrote more than ``sandbox.max_output_bytes`` and was killed.
``no_verdict``      it ended without a valid report line (early exit, crash, signal).
``sandbox_error``   the sandbox itself failed to start the program (an infrastructure fault, not the model's).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

STATUSES = ("passed", "failed", "runtime_error", "syntax_error", "compile_error", "timeout", "memory_limit",
            "output_limit", "no_verdict", "sandbox_error")
HARNESS_STATUSES = frozenset({"passed", "failed", "runtime_error", "syntax_error", "compile_error", "memory_limit"})
_MAX_ERROR_CHARS = 2000


def new_nonce() -> str:
    return secrets.token_hex(16)


@dataclass
class Verdict:
    """The outcome of one program: a status label and, per test, whether it passed.

    ``tests_passed``/``tests_total`` count individual test cases in fraction mode; in check mode (one test
    function, HumanEval style) the program is one test. ``stdout``/``stderr`` are truncated copies for debugging.
    """

    status: str
    tests_passed: int = 0
    tests_total: int = 1
    error: str = ""
    exit_code: int | None = None
    wall_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    per_test: list[bool] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def fraction_passed(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else 0.0

    def result_text(self) -> str:
        """One human-eval-style line: ``passed``, or ``<status>: <error>``."""
        return self.status if not self.error else f"{self.status}: {self.error}"


def parse_report(stdout: bytes, nonce: str) -> dict | None:
    """The last well-formed report line carrying ``nonce`` as ``{"status", "passed", "error"}``, or None."""
    marker = nonce.encode() + b" "
    position = stdout.rfind(b"\n" + marker)
    if position < 0:
        if not stdout.startswith(marker):
            return None
        position = -1
    line = stdout[position + 1 + len(marker):].split(b"\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    status, bits, error_hex = (part.decode("ascii", errors="replace") for part in parts)
    if status not in HARNESS_STATUSES or not bits or set(bits) - {"0", "1"}:
        return None
    try:
        error = "" if error_hex == "-" else bytes.fromhex(error_hex).decode("utf-8", errors="replace")
    except ValueError:
        return None
    return {"status": status, "passed": [bit == "1" for bit in bits], "error": error}


def strip_report(stdout: bytes, nonce: str) -> bytes:
    """``stdout`` without the report line(s) carrying ``nonce`` (what the program itself printed)."""
    marker = nonce.encode() + b" "
    lines = stdout.split(b"\n")
    return b"\n".join(line for line in lines if not line.startswith(marker))


def verdict_from_report(report: dict, *, num_tests: int) -> Verdict:
    """Turn a harness report into a :class:`Verdict`; ``num_tests`` is how many tests the job had."""
    status = report["status"]
    per_test = list(report.get("passed") or [])
    if len(per_test) != num_tests:  # a report from before the tests ran, or a malformed one
        per_test = (per_test + [False] * num_tests)[:num_tests]
    if status == "passed" and not all(per_test):
        status = "failed"  # the harness says passed but a test did not: trust the per-test record
    return Verdict(status=status, tests_passed=sum(per_test), tests_total=num_tests, per_test=per_test,
                   error=str(report.get("error") or "")[:_MAX_ERROR_CHARS])
