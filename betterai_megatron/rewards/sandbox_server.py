"""The sandbox server: a small child process that starts, times, kills and reaps every sandboxed program.

Why a separate process rather than threads in the trainer:

* it is a *child subreaper* (orphaned namespace inits must be reaped by someone, see :mod:`.process_sweep`), a
  process-wide setting the trainer should not take on;
* its memory holds program outputs, not the trainer's tensors, and a bug here cannot take the trainer down;
* when the trainer dies, its end of the request pipe closes and the server exits; every program it started was
  launched with ``setpriv --pdeathsig KILL`` and dies with it.

Protocol (stdin/stdout, trusted both ways): frames of an 8-byte big-endian length and a pickle. The first frame
from the pool is the :class:`SandboxConfig`; the server answers ``("ready", isolated)`` or ``("error", message)``.
Then each request ``(request_id, RunSpec)`` is answered, in completion order, by ``(request_id, RawRun)`` or
``(request_id, "<error text>")``. ``sandbox.workers`` requests run at once, one per slot.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

_HEADER = struct.Struct(">Q")


def write_frame(stream: BinaryIO, obj: object, lock: threading.Lock | None = None) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(payload)) + payload
    if lock is None:
        stream.write(data)
        stream.flush()
        return
    with lock:
        stream.write(data)
        stream.flush()


def read_frame(stream: BinaryIO) -> object | None:
    """The next object, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


def serve(requests: BinaryIO, responses: BinaryIO) -> int:
    from betterai_megatron.rewards.sandbox import Sandbox  # after the pipe is set up: import errors get reported

    config = read_frame(requests)
    if config is None:
        return 0
    try:
        sandbox = Sandbox(config)
    except Exception as exc:  # noqa: BLE001 - reported to the pool, which raises it in the trainer
        write_frame(responses, ("error", f"{type(exc).__name__}: {exc}"))
        return 1
    write_frame(responses, ("ready", sandbox.isolated))
    lock = threading.Lock()
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    workers = config.num_workers
    for slot in range(workers):
        slots.put(slot)

    def run_one(request_id: int, spec) -> None:
        slot = slots.get()
        try:
            result: object = sandbox.run(spec, slot=slot)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            result = f"{type(exc).__name__}: {exc}"
        finally:
            slots.put(slot)
        try:
            write_frame(responses, (request_id, result), lock)
        except (BrokenPipeError, OSError):
            os._exit(0)  # the pool is gone

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox-slot")
    while True:
        request = read_frame(requests)
        if request is None:
            break
        request_id, spec = request
        executor.submit(run_one, request_id, spec)
    # The pool closed its end. Exit at once: programs still running were started with ``--pdeathsig KILL`` by
    # worker threads that die with this process, so they are killed with it.
    executor.shutdown(wait=False, cancel_futures=True)
    os._exit(0)


def main() -> int:
    requests = sys.stdin.buffer
    responses = sys.stdout.buffer
    # Nothing else may write to the response pipe: point fd 1 at stderr for stray prints.
    responses = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        return serve(requests, responses)
    finally:
        responses.close()


if __name__ == "__main__":
    sys.exit(main())
