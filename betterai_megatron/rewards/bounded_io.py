"""Feed a child process its stdin and collect its stdout/stderr under a deadline and a byte cap.

``subprocess.Popen.communicate`` buffers unbounded output and, on timeout, leaves the caller to kill and drain;
a program printing gigabytes would exhaust the trainer's memory first. :func:`communicate_bounded` multiplexes the
three pipes with :mod:`selectors` and calls ``kill()`` itself the moment the deadline passes or the combined
output exceeds the cap, then keeps only what it has read. Hand-written: no library does this for pipes.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

_READ_CHUNK_BYTES = 65536
# After a kill, wait at most this long for the pipes to close (every writer is dead by then in the sandbox).
_DRAIN_GRACE_S = 2.0


@dataclass
class CapturedOutput:
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_exceeded: bool
    wall_s: float


def communicate_bounded(proc: subprocess.Popen, *, stdin_bytes: bytes, timeout_s: float, max_output_bytes: int,
                        kill: Callable[[], None]) -> CapturedOutput:
    """Write ``stdin_bytes``, read both outputs, and wait for ``proc``; ``kill()`` on timeout or output overflow.

    ``proc`` must have been started with ``stdin``, ``stdout`` and ``stderr`` all ``subprocess.PIPE``.
    Returns the bytes read (at most ``max_output_bytes`` in total) and which limit, if any, was hit.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    total = 0
    timed_out = exceeded = killed = False
    pending = memoryview(stdin_bytes)
    selector = selectors.DefaultSelector()
    try:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        for stream in (proc.stdout, proc.stderr):
            selector.register(stream, selectors.EVENT_READ)
        kill_deadline = None
        while selector.get_map():
            now = time.monotonic()
            if not killed and now >= deadline:
                timed_out = killed = True
                kill()
            if killed:
                kill_deadline = kill_deadline or now + _DRAIN_GRACE_S
                if now >= kill_deadline:
                    break
            wait_s = (kill_deadline if killed else deadline) - now
            for key, _ in selector.select(timeout=max(0.0, wait_s)):
                if key.fileobj is proc.stdin:
                    pending = _write_some(proc, selector, pending)
                    continue
                chunk = os.read(key.fd, _READ_CHUNK_BYTES)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                room = max_output_bytes - total
                buffers[key.fd] += chunk[:room]
                total += min(len(chunk), room)
                if len(chunk) > room and not killed:
                    exceeded = killed = True
                    kill()
    finally:
        selector.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    if _wait_or_kill(proc, deadline=deadline, killed=killed, kill=kill):
        timed_out = True  # closed its outputs but kept running past the deadline
    return CapturedOutput(bytes(buffers[out_fd]), bytes(buffers[err_fd]), timed_out, exceeded,
                          time.monotonic() - start)


def _write_some(proc: subprocess.Popen, selector: selectors.BaseSelector, pending: memoryview) -> memoryview:
    try:
        written = os.write(proc.stdin.fileno(), pending[:_READ_CHUNK_BYTES])
    except (BrokenPipeError, OSError):  # the program closed stdin or exited: stop feeding it
        written = len(pending)
    pending = pending[written:]
    if not pending:
        selector.unregister(proc.stdin)
        proc.stdin.close()
    return pending


def _wait_or_kill(proc: subprocess.Popen, *, deadline: float, killed: bool, kill: Callable[[], None]) -> bool:
    """Reap ``proc``: wait until the deadline (outputs closed early), then kill; never block forever.

    Returns True when this function had to kill ``proc`` because the deadline passed.
    """
    killed_here = False
    if not killed:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            kill()
            killed_here = True
    try:
        proc.wait(timeout=_DRAIN_GRACE_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of our own child cannot be ignored
        proc.kill()
        proc.wait()
    return killed_here
