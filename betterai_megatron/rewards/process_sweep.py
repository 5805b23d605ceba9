"""Kill and reap what a sandboxed run left behind (the sweep after every run).

Inside bubblewrap a program cannot outlive its sandbox: the sandbox has its own PID namespace, and when that
namespace's init dies (bubblewrap's ``--die-with-parent`` makes it die with our child) the kernel kills every
process in it. The sweep is the second lock on the same door, and it is what makes slot reuse safe: each pool
slot runs programs under its own unprivileged host uid, so after a run we kill whatever that uid still runs in
our process subtree and wait until nothing is left; RLIMIT_NPROC of the next program on the slot starts from zero.

Zombies matter too: bubblewrap's outer process exits as soon as it learns the exit code, leaving the namespace's
init to finish exiting as an orphan. Orphans go to the nearest *child subreaper*; the sandbox server process
(:mod:`.sandbox_server`) is one, so it reaps them here, with a ``waitpid`` on exactly those pids (never
``waitpid(-1)``, which would steal the exit status of a program another thread is waiting for). Left alone they
would sit as zombies under PID 1 (which in a container may never reap them) and count against RLIMIT_NPROC.

Everything a run leaves is in our subtree (orphans are re-parented to us), so the sweep walks
``/proc/<pid>/task/<tid>/children`` from this process down instead of reading every ``/proc/<pid>/status`` on the
host. :func:`processes_of_uid` does the full scan; the tests use it as the independent check.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    parent_pid: int
    real_uid: int
    zombie: bool


def process_info(pid: int) -> ProcessInfo | None:
    """Parent, real uid and zombie state of ``pid`` from ``/proc/<pid>/status``; None once it is gone.

    ``status`` is world-readable even for non-dumpable processes, unlike the owner of ``/proc/<pid>``, which a
    program can turn into root with ``prctl(PR_SET_DUMPABLE, 0)``.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            status = handle.read(4096)
    except OSError:
        return None
    fields = {}
    for line in status.split(b"\n", 12)[:12]:  # Name, Umask, State, Tgid, Ngid, Pid, PPid, TracerPid, Uid, ...
        key, _, value = line.partition(b":")
        fields[key] = value.strip()
    uids = fields.get(b"Uid", b"-1").split()
    return ProcessInfo(pid=pid, parent_pid=int(fields.get(b"PPid", b"0")), real_uid=int(uids[0]),
                       zombie=fields.get(b"State", b"").startswith(b"Z"))


def processes_of_uid(uid: int) -> list[ProcessInfo]:
    """Every process on the host whose real uid is ``uid`` (a full ``/proc`` scan; a racy snapshot)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = process_info(int(entry.name))
            if info is not None and info.real_uid == uid:
                found.append(info)
    return found


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads), from ``/proc/<pid>/task/<tid>/children``."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                children.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return children


def reap_orphans(is_active: Callable[[int], bool]) -> int:
    """``waitpid`` every zombie child of this process for which ``is_active(pid)`` is False; returns the count.

    ``is_active`` must say True for the pids that a ``subprocess.Popen`` in this process will reap itself, and
    the caller must hold the lock under which those pids are registered (so no new child slips in unseen).
    """
    reaped = 0
    for pid in children_of(os.getpid()):
        if is_active(pid):
            continue
        info = process_info(pid)
        if info is not None and info.zombie:
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
            except ChildProcessError:
                pass
    return reaped


def sweep_uid(uid: int, *, reap: Callable[[], int], wait_s: float = 2.0) -> int:
    """SIGKILL every process of ``uid`` in this process's subtree until none is left; returns how many.

    ``reap()`` is called on every round to collect the zombies (see :func:`reap_orphans`). Gives up after
    ``wait_s``. ``uid`` must not be 0 or the caller's own uid.
    """
    if uid in (0, os.getuid(), os.geteuid()):
        raise ValueError(f"refusing to sweep uid {uid}: it is root or this process's own uid")
    deadline = time.monotonic() + wait_s
    killed: set[int] = set()
    while True:
        reap()
        remaining = _subtree_of_uid(uid)
        if not remaining:
            return len(killed)
        for info in remaining:
            if info.zombie:
                continue  # its parent (the dying namespace init, then us) reaps it
            try:
                os.kill(info.pid, signal.SIGKILL)
                killed.add(info.pid)
            except ProcessLookupError:
                pass
        if time.monotonic() >= deadline:
            return len(killed)
        time.sleep(0.002)


def _subtree_of_uid(uid: int) -> list[ProcessInfo]:
    """Processes of ``uid`` below this process (descending only through processes of ``uid``)."""
    found = []
    frontier = children_of(os.getpid())
    while frontier:
        pid = frontier.pop()
        info = process_info(pid)
        if info is None or info.real_uid != uid:
            continue
        found.append(info)
        frontier.extend(children_of(pid))
    return found


def become_subreaper() -> None:
    """Make this process adopt its orphaned descendants (so that :func:`reap_orphans` can reap them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
