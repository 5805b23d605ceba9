"""A process pool that returns batch results in input order and survives workers that die.

Owns :class:`OrderedPool`. Megatron-LM's ``multiprocessing.Pool.imap`` waits forever for the result of a worker
that died (or raised in its initializer); here a dead worker is detected by ``concurrent.futures``
(``BrokenProcessPool``), the pool is rebuilt, and the batches that were in flight are replayed one at a time to
find the one that kills a worker. That batch is then replayed item by item; an item that kills a worker again is
turned into a rejection by the caller's ``on_crash`` (so every other document is kept). After
``max_deaths`` deaths the run stops with :class:`WorkerDeathError` instead of retrying forever. A Python
exception raised by a worker (a bug, not bad input: bad input is rejected inside the worker) stops the run
with :class:`WorkerError` carrying the worker's traceback.

Workers are forked (Linux): the parent loads the tokenizer before the pool starts and every worker inherits it.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Self

CRASH_REASON = "a worker process died while encoding this record (it was retried alone, and died again)"


class WorkerDeathError(RuntimeError):
    """Workers died more often than allowed."""


class WorkerError(RuntimeError):
    """A worker raised an exception that is not about the input."""


def _noop() -> None:
    return None


class OrderedPool:
    """``map_ordered(tasks)`` over forked workers with crash isolation (see module docstring)."""

    def __init__(self, *, fn: Callable, workers: int, initializer: Callable, initargs: tuple,
                 max_in_flight: int, max_deaths: int, split: Callable, merge: Callable, on_crash: Callable,
                 before_restart: Callable[[], None] | None = None) -> None:
        self._fn = fn
        self._workers = workers
        self._initializer, self._initargs = initializer, initargs
        self._max_in_flight = max(max_in_flight, workers)
        self._max_deaths = max_deaths
        self._split, self._merge, self._on_crash = split, merge, on_crash
        self._before_restart = before_restart
        self.deaths = 0
        self._executor: ProcessPoolExecutor | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Fork all workers now (one task per worker forces it), before the caller starts any thread."""
        context = multiprocessing.get_context("fork")
        self._executor = ProcessPoolExecutor(self._workers, mp_context=context, initializer=self._initializer,
                                             initargs=self._initargs)
        try:
            for future in [self._executor.submit(_noop) for _ in range(self._workers)]:
                future.result()
        except BrokenProcessPool as error:
            raise WorkerError("worker processes failed to start (their initializer failed)") from error

    def close(self, *, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

    def _restart(self) -> None:
        self.deaths += 1
        if self.deaths > self._max_deaths:
            raise WorkerDeathError(f"worker processes died {self.deaths} times; giving up (out of memory? "
                                   "a crashing tokenizer?)")
        if self._before_restart is not None:
            self._before_restart()  # e.g. wait for a background import: never fork while a thread imports
        executor, self._executor = self._executor, None
        executor.shutdown(wait=True, cancel_futures=True)
        self.start()

    # -- running -----------------------------------------------------------------------------------------------
    def _result(self, future):
        try:
            return future.result()
        except BrokenProcessPool:
            raise
        except Exception as error:
            raise WorkerError(f"a worker failed: {type(error).__name__}: {error}") from error

    def _run_alone(self, task):
        """Run one task with nothing else in flight; None if it killed its worker."""
        try:
            return self._result(self._executor.submit(self._fn, task))
        except BrokenProcessPool:
            self._restart()
            return None

    def _replay(self, task):
        """A task that was in flight when a worker died: alone, then item by item if it kills again."""
        result = self._run_alone(task)
        if result is not None:
            return result
        parts = []
        for item in self._split(task):
            part = self._run_alone(item)
            parts.append(part if part is not None else self._on_crash(item, CRASH_REASON))
        return self._merge(task, parts)

    def map_ordered(self, tasks: Iterable) -> Iterator:
        """Results of ``fn(task)`` in the order of ``tasks``; at most ``max_in_flight`` tasks submitted at once."""
        if self._executor is None:
            self.start()
        source = iter(tasks)
        pending: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < self._max_in_flight:
                task = next(source, None)
                if task is None:
                    exhausted = True
                    break
                pending.append((task, self._executor.submit(self._fn, task)))
            if not pending:
                return
            task, future = pending[0]
            try:
                result = self._result(future)
            except BrokenProcessPool:
                replay = [t for t, _ in pending]
                pending.clear()
                self._restart()
                for task in replay:
                    yield self._replay(task)
                continue
            pending.popleft()
            yield result
