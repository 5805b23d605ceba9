"""Run code jobs in any enabled language and get verdicts: the sandbox pool plus the language runners.

:class:`CodeExecutor` is what rewards and evaluation call::

    with CodeExecutor(SandboxConfig(workers=4)) as executor:
        verdicts = executor.run([job_for_problem(problem, completion) for ...])

``job_for_problem`` turns a :class:`~betterai_megatron.data.problems.Problem` and a completion into a
:class:`CodeJob` in check mode (the problem's test function, one test) or case mode (each of the problem's
``test_cases`` counted separately, for fraction-passed rewards).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from betterai_megatron.rewards.languages import RUNNERS, CodeJob, LanguageRunner, normalize_language
from betterai_megatron.rewards.sandbox import RawRun
from betterai_megatron.rewards.sandbox_config import SandboxConfig
from betterai_megatron.rewards.verdict import Verdict, new_nonce
from betterai_megatron.rewards.worker_pool import SandboxPool, SandboxServerError

if TYPE_CHECKING:
    from betterai_megatron.data.problems import Problem

TEST_MODES = ("check", "cases", "auto")


class CodeExecutor:
    """Turns :class:`CodeJob` objects into sandboxed runs and their :class:`Verdict`."""

    def __init__(self, config: SandboxConfig, *, pool: SandboxPool | None = None) -> None:
        config.validate()
        self.config = config
        self._owns_pool = pool is None
        self.pool = pool if pool is not None else SandboxPool(config)
        self._runners: dict[str, LanguageRunner] = {}
        self._lock = threading.Lock()

    @property
    def isolated(self) -> bool:
        return self.pool.isolated

    def runner(self, language: str) -> LanguageRunner:
        """The runner for ``language``; errors when it is not in ``sandbox.languages`` or has no toolchain."""
        name = normalize_language(language)
        with self._lock:
            if name in self._runners:
                return self._runners[name]
            if name not in self.config.languages:
                raise ValueError(f"language {name!r} is not enabled: sandbox.languages={self.config.languages}")
            runner = RUNNERS[name](self.config, isolated=self.pool.isolated)
            problem = runner.toolchain_problem()
            if problem is not None:
                raise RuntimeError(problem)
            self._runners[name] = runner
            return runner

    def job_for(self, problem: Problem, completion: str, *, mode: str = "check") -> CodeJob:
        """:func:`job_for_problem` with this executor's runner for the problem's language."""
        return job_for_problem(problem, completion, mode=mode, runner=self.runner(problem.language))

    def submit(self, job: CodeJob) -> Future:
        """Queue ``job``; the future resolves to its :class:`Verdict` (never raises for program behaviour)."""
        runner = self.runner(job.language)
        nonce = new_nonce()
        verdict_future: Future = Future()
        run_future = self.pool.submit(runner.build_spec(job, nonce=nonce))

        def finish(done: Future) -> None:
            try:
                raw: RawRun = done.result()
                verdict_future.set_result(runner.verdict(raw, job, nonce=nonce))
            except SandboxServerError as exc:
                verdict_future.set_result(Verdict(status="sandbox_error", tests_total=job.num_tests,
                                                  per_test=[False] * job.num_tests, error=str(exc)))
            except BaseException as exc:  # noqa: BLE001 - surface bugs to the caller
                verdict_future.set_exception(exc)

        run_future.add_done_callback(finish)
        return verdict_future

    def run(self, jobs: Iterable[CodeJob]) -> list[Verdict]:
        """Run every job (``sandbox.workers`` at a time); verdicts in the order of ``jobs``."""
        futures = [self.submit(job) for job in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> CodeExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def job_for_problem(problem: Problem, completion: str, *, mode: str = "check",
                    runner: LanguageRunner | None = None) -> CodeJob:
    """The job that tests ``completion`` on ``problem``.

    ``mode``: ``check`` runs the problem's test function (one test, HumanEval's convention); ``cases`` runs each of
    ``problem.test_cases`` separately (an error when the problem has none); ``auto`` uses cases when there are some.
    ``runner`` decides how prompt and completion combine (default: prompt + completion).
    """
    if mode not in TEST_MODES:
        raise ValueError(f"test mode must be one of {TEST_MODES}, got {mode!r}")
    if mode == "cases" and not problem.test_cases:
        raise ValueError(f"problem {problem.task_id!r} has no individual test_cases for mode='cases'")
    use_cases = mode == "cases" or (mode == "auto" and bool(problem.test_cases))
    program = (runner.assemble_program(problem.prompt, completion, problem.entry_point) if runner is not None
               else problem.prompt + completion)
    return CodeJob(language=normalize_language(problem.language), program=program, tests=problem.tests,
                   entry_point=problem.entry_point, test_cases=list(problem.test_cases) if use_cases else None,
                   setup=problem.setup_code)
