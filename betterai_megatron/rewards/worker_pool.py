"""A bounded pool that runs many sandboxed programs at once: the trainer-side handle of the sandbox server.

``SandboxPool(config)`` starts :mod:`.sandbox_server` as a child process and sends it :class:`RunSpec` requests;
at most ``sandbox.workers`` programs run at a time, the rest wait in the server's queue. Each request returns a
:class:`concurrent.futures.Future` of a :class:`RawRun`. A misbehaving program only ever costs its own slot until
its limits kill it; if the server process itself dies (it should not), pending requests fail with
:class:`SandboxServerError` and the next request starts a new server.

Usage::

    with SandboxPool(SandboxConfig(workers=8)) as pool:
        runs = pool.run_many(specs)
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import Future

from betterai_megatron.rewards.sandbox import RawRun, RunSpec, SandboxUnavailableError
from betterai_megatron.rewards.sandbox_config import SandboxConfig
from betterai_megatron.rewards.sandbox_server import read_frame, write_frame


class SandboxServerError(RuntimeError):
    """The sandbox server process failed (not a program: programs never raise, they get a verdict)."""


class SandboxPool:
    """Runs :class:`RunSpec` programs in a sandbox server process, ``config.num_workers`` at a time."""

    def __init__(self, config: SandboxConfig) -> None:
        config.validate()
        self.config = config
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Future, subprocess.Popen]] = {}
        self._closed = False
        self._server: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.isolated = False
        self.server_starts = 0
        self._start_server()

    # -------------------------------------------------------------------------------------- server lifecycle
    def _start_server(self) -> None:
        server = subprocess.Popen([sys.executable, "-m", "betterai_megatron.rewards.sandbox_server"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            write_frame(server.stdin, self.config)
            reply = read_frame(server.stdout)
        except (BrokenPipeError, OSError) as exc:
            reply = ("error", f"the sandbox server could not start: {exc}")
        if not (isinstance(reply, tuple) and reply and reply[0] == "ready"):
            server.kill()
            server.wait()
            message = reply[1] if isinstance(reply, tuple) and len(reply) == 2 else "the sandbox server exited"
            if "SandboxUnavailableError" in str(message):
                raise SandboxUnavailableError(str(message).split(": ", 1)[-1])
            raise SandboxServerError(str(message))
        self.isolated = bool(reply[1])
        self._server = server
        self.server_starts += 1
        self._reader = threading.Thread(target=self._read_responses, args=(server,), daemon=True,
                                        name="sandbox-pool-reader")
        self._reader.start()

    def _read_responses(self, server: subprocess.Popen) -> None:
        while True:
            try:
                frame = read_frame(server.stdout)
            except Exception:  # noqa: BLE001 - a corrupt frame means the server is broken
                frame = None
            if frame is None:
                break
            request_id, result = frame
            with self._lock:
                future, _ = self._pending.pop(request_id, (None, None))
            if future is None:
                continue
            if isinstance(result, RawRun):
                future.set_result(result)
            else:
                future.set_exception(SandboxServerError(f"the sandbox failed to run a program: {result}"))
        with self._lock:  # the server is gone: fail whatever it still owed us
            if self._server is server:
                self._server = None
            orphaned = [rid for rid, (_, owner) in self._pending.items() if owner is server]
            orphaned = [self._pending.pop(rid)[0] for rid in orphaned]
        for future in orphaned:
            future.set_exception(SandboxServerError("the sandbox server exited while running this program"))

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, spec: RunSpec) -> Future:
        """Queue one program; the future resolves to its :class:`RawRun`."""
        future: Future = Future()
        with self._lock:
            if self._server is None or self._server.poll() is not None:
                if self._closed:
                    raise RuntimeError("the sandbox pool is closed")
                self._start_server()
            request_id = next(self._ids)
            self._pending[request_id] = (future, self._server)
            try:
                write_frame(self._server.stdin, (request_id, spec))
            except (BrokenPipeError, OSError) as exc:
                self._pending.pop(request_id, None)
                future.set_exception(SandboxServerError(f"the sandbox server is gone: {exc}"))
        return future

    @property
    def server_pid(self) -> int | None:
        """PID of the current sandbox server (slot uids derive from it, see :func:`.sandbox.slot_uid`)."""
        server = self._server
        return server.pid if server is not None else None

    def run_many(self, specs: Iterable[RunSpec]) -> list[RawRun]:
        """Run all ``specs`` (``workers`` at a time) and return their results in order."""
        futures = [self.submit(spec) for spec in specs]
        return [future.result() for future in futures]

    def run(self, spec: RunSpec) -> RawRun:
        return self.submit(spec).result()

    def close(self) -> None:
        """Stop the server; programs still running are killed."""
        with self._lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            try:
                server.stdin.close()
            except OSError:
                pass
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
