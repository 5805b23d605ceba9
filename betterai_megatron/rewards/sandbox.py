"""The only place untrusted code runs: one program in a bubblewrap sandbox, with limits, under a deadline.

Threat model
============
The code comes from a model being trained (or from a benchmark's samples file). Assume it is hostile: it may try
to read secrets, change the host, reach the network, exhaust resources, outlive its run, or fake its own result.

What the sandbox stops (each verified by a test in ``tests/rewards/test_rewards_sandbox_adversarial.py``):

* **Reading the host.** The program sees a fresh root: read-only ``/usr`` (plus ``/etc/ld.so.cache`` and
  ``/etc/alternatives`` so that binaries link), its own ``/proc``, a minimal ``/dev``, and the files of its job.
  Home directories, ``/etc``, the training data, checkpoints and credentials are absent; the environment is
  cleared (``--clearenv``), so host variables do not leak.
* **Changing the host.** ``/`` and ``/usr`` are read-only; the only writable place is a private tmpfs at ``/tmp``
  capped at ``sandbox.tmpfs_size_mb`` and discarded when the program ends. Mounts are ``nosuid``.
* **The network.** A new, empty network namespace (its own loopback only, so ``127.0.0.1`` is not the host's), and
  the seccomp filter makes ``socket()`` fail for every family but ``AF_UNIX``.
* **Other processes.** Own PID, IPC, UTS and cgroup namespaces: the program sees only its own processes and cannot
  signal or trace anything outside (``ptrace`` and ``process_vm_*`` are also denied by seccomp).
* **Privilege.** Each pool slot runs under its own unprivileged host uid (65534 inside), with every capability
  dropped, ``no_new_privs`` set, and no nested user namespaces (``--disable-userns``). Root is never used.
* **Resource exhaustion.** ``prlimit`` sets RLIMIT_AS (``memory_mb``), RLIMIT_CPU, RLIMIT_NPROC (``max_processes``,
  effective because the uid is unprivileged and private to the slot: a fork bomb stops there), RLIMIT_FSIZE,
  RLIMIT_NOFILE and no core dumps. Output is capped at ``max_output_bytes``; past it, or past ``timeout_s``, the
  whole process tree is killed.
* **Outliving the run.** A daemonized child dies with the sandbox: when the program's PID namespace loses its
  init (``--die-with-parent``) the kernel kills everything in it; a sweep then kills whatever the slot's uid still
  owns and waits until nothing is left before the slot is reused (:mod:`.process_sweep`).
* **Faking a pass.** The verdict comes from a nonce-tagged report line (:mod:`.verdict`); an early ``exit(0)`` or a
  printed "passed" is a failure.

What it does not stop:

* **Kernel exploits and side channels.** All sandboxes share the host kernel (seccomp trims the attack surface;
  there is no VM boundary as in gVisor or Firecracker). Timing side channels are not addressed.
* **CPU and memory contention.** There is no cgroup quota: a program may keep every core busy with threads until its
  CPU-time limit, and RLIMIT_AS is per process, so one program may hold up to ``max_processes × memory_mb`` plus
  its tmpfs. Size ``workers`` and the limits for the host.
* **Reading what is world-readable under ``/usr``** (the installed software) and system-wide ``/proc`` files such as
  ``/proc/cpuinfo``.
* **A program that deliberately reads the harness's memory** to forge its verdict (see :mod:`.verdict`).
* **Anything, when ``sandbox.allow_unsafe=true`` and bubblewrap is missing:** programs then run as the trainer's
  user with only rlimits, a private working directory and a cleared environment. That mode exists for laptops
  without bubblewrap and says so loudly; never use it on model output you do not control.

A run is described by a :class:`RunSpec` (argv inside the sandbox, stdin, read-only job files) and returns a
:class:`RawRun`; language harnesses turn that into a :class:`~betterai_megatron.rewards.verdict.Verdict`.
A :class:`Sandbox` makes its process a child subreaper, so it is meant to live in the sandbox server process that
:class:`~betterai_megatron.rewards.worker_pool.SandboxPool` starts, not in the trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field

from betterai_megatron.rewards.bounded_io import communicate_bounded
from betterai_megatron.rewards.process_sweep import become_subreaper, reap_orphans, sweep_uid
from betterai_megatron.rewards.sandbox_config import MAX_WORKERS, SandboxConfig
from betterai_megatron.rewards.seccomp_filter import build_seccomp_bpf

logger = logging.getLogger(__name__)

FILES_PLACEHOLDER = "{files}"  # in RunSpec.argv: the read-only directory holding RunSpec.files
SCRATCH_PLACEHOLDER = "{scratch}"  # in RunSpec.argv: the writable working directory
SANDBOX_FILES_DIR = "/sandbox"
SANDBOX_SCRATCH_DIR = "/tmp"
SANDBOX_UID = 65534  # "nobody" inside the user namespace
STARTED_MARKER = b"\x1ebetterai-started\n"  # every harness writes this first; without it the sandbox failed
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_ETC_PATHS = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives")
_MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")


class SandboxUnavailableError(RuntimeError):
    """bubblewrap (or user namespaces) is missing and ``sandbox.allow_unsafe`` is false."""


@dataclass
class RunSpec:
    """One program to run. ``argv`` may use ``{files}`` and ``{scratch}`` placeholders."""

    argv: list[str]
    stdin: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)
    timeout_s: float | None = None  # default: sandbox.timeout_s
    ro_paths: list[str] = field(default_factory=list)  # extra host paths to bind read-only (same path inside)


@dataclass
class RawRun:
    stdout: bytes
    stderr: bytes
    exit_code: int | None
    timed_out: bool
    output_exceeded: bool
    wall_s: float
    started: bool  # the harness wrote STARTED_MARKER: the sandbox itself worked
    isolated: bool

    @property
    def program_stdout(self) -> bytes:
        return self.stdout[len(STARTED_MARKER):] if self.started else self.stdout


def bubblewrap_path(config: SandboxConfig) -> str | None:
    return shutil.which(config.bwrap_path)


def slot_uid(config: SandboxConfig, slot: int, *, pid: int | None = None) -> int:
    """The host uid of pool slot ``slot`` in process ``pid`` (default: this one; see :mod:`.sandbox_config`)."""
    if not 0 <= slot < MAX_WORKERS:
        raise ValueError(f"slot {slot} outside [0, {MAX_WORKERS})")
    return config.uid_base + ((os.getpid() if pid is None else pid) % (1 << 22)) * MAX_WORKERS + slot


class Sandbox:
    """Runs :class:`RunSpec` programs in bubblewrap (or, only if allowed and bubblewrap is missing, unisolated)."""

    def __init__(self, config: SandboxConfig) -> None:
        config.validate()
        self.config = config
        self._bwrap = bubblewrap_path(config)
        self._prlimit = shutil.which("prlimit")
        self._setpriv = shutil.which("setpriv")
        self.isolated = self._bwrap is not None
        self._spawn_lock = threading.Lock()  # Popen + registration vs. reaping orphans: see process_sweep
        self._active_pids: set[int] = set()
        if not self.isolated:
            self._refuse_or_warn(f"bubblewrap ({config.bwrap_path!r}) was not found on PATH")
            return
        self._as_root = os.geteuid() == 0
        if not self._as_root:
            # Dropping to a per-slot uid needs root. Unprivileged, programs run under the trainer's own uid (still
            # inside the namespaces), RLIMIT_NPROC would count the trainer's own threads so it is not set, and the
            # stray-process sweep is skipped; the PID namespace still bounds fork bombs to the run's lifetime.
            logger.warning("sandbox: not running as root: no per-slot uid, no RLIMIT_NPROC, no uid sweep")
        if self._prlimit is None or self._setpriv is None:
            raise SandboxUnavailableError("prlimit / setpriv (util-linux) are missing: limits and the uid drop "
                                          "cannot be applied")
        self._seccomp_bpf = build_seccomp_bpf() if config.seccomp else None
        become_subreaper()  # see process_sweep: orphaned namespace inits must be reaped by this process
        self._probe()

    # ----------------------------------------------------------------------------------------------- set-up
    def _refuse_or_warn(self, reason: str) -> None:
        if not self.config.allow_unsafe:
            raise SandboxUnavailableError(
                f"{reason}: refusing to run untrusted code without isolation. Install bubblewrap "
                "(Debian: apt-get install bubblewrap; scripts/setup_system.sh does it) or, only for code you "
                "trust, set sandbox.allow_unsafe=true.")
        message = (f"UNSAFE: {reason}; sandbox.allow_unsafe=true, so untrusted programs run WITHOUT isolation "
                   "(only rlimits, a private directory and a cleared environment). Never use this on model output "
                   "you do not control.")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)
        print(f"betterai sandbox WARNING: {message}", file=sys.stderr, flush=True)

    def _probe(self) -> None:
        """Start one empty sandbox so that a host without user namespaces fails here, with bwrap's reason."""
        spec = RunSpec(argv=["/bin/sh", "-c", "printf '\\036betterai-started\\n'"], timeout_s=10.0)
        run = self.run(spec, slot=MAX_WORKERS - 1)
        if not run.started or run.exit_code != 0:
            reason = run.stderr.decode(errors="replace").strip() or f"exit code {run.exit_code}"
            if self.config.allow_unsafe:
                self.isolated = False
                self._refuse_or_warn(f"bubblewrap cannot create a sandbox here ({reason})")
                return
            raise SandboxUnavailableError(
                f"bubblewrap cannot create a sandbox on this host: {reason}. It needs unprivileged user "
                "namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0).")

    # -------------------------------------------------------------------------------------------------- run
    def run(self, spec: RunSpec, *, slot: int) -> RawRun:
        """Run ``spec`` on pool slot ``slot`` (one program per slot at a time) and return what happened."""
        timeout_s = spec.timeout_s if spec.timeout_s is not None else self.config.timeout_s
        if self.isolated:
            return self._run_isolated(spec, slot=slot, timeout_s=timeout_s)
        return self._run_unsafe(spec, timeout_s=timeout_s)

    def _limit_args(self, timeout_s: float, *, nproc: bool) -> list[str]:
        c = self.config
        args = [self._prlimit or "prlimit", f"--as={c.memory_mb << 20}", f"--cpu={c.cpu_time_limit_s(timeout_s)}",
                f"--fsize={c.max_file_size_mb << 20}", f"--nofile={c.max_open_files}", "--core=0"]
        return args + ([f"--nproc={c.max_processes}"] if nproc else []) + ["--"]

    def _setpriv_args(self, uid: int | None) -> list[str]:
        """Drop to ``uid`` (root only) and die with the thread that started us (the pool's worker thread).

        setpriv, not ``Popen(user=...)``: CPython only uses vfork() when no uid/gid change is requested, and
        vfork keeps a spawn cheap however large this process grows; ``preexec_fn`` is unsafe with threads.
        """
        args = [self._setpriv or "setpriv"]
        if uid is not None:
            args += ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
        return args + ["--pdeathsig", "KILL", "--"]

    def _bwrap_args(self, spec: RunSpec, fds: dict[str, int], seccomp_fd: int | None) -> list[str]:
        c = self.config
        args = [self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--cap-drop", "ALL", "--clearenv", "--uid", str(SANDBOX_UID), "--gid",
                str(SANDBOX_UID), "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for name in _MERGED_USR_LINKS:
            host = f"/{name}"
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                args += ["--ro-bind", host, host]
        for path in [*_ETC_PATHS, *c.extra_ro_paths, *spec.ro_paths]:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(c.tmpfs_size_mb << 20), "--tmpfs",
                 SANDBOX_SCRATCH_DIR, "--chdir", SANDBOX_SCRATCH_DIR]
        for name, value in (("PATH", _SANDBOX_PATH), ("HOME", SANDBOX_SCRATCH_DIR), ("LANG", "C.UTF-8"),
                            ("TMPDIR", SANDBOX_SCRATCH_DIR)):
            args += ["--setenv", name, value]
        for name, fd in fds.items():
            args += ["--perms", "0444", "--ro-bind-data", str(fd), f"{SANDBOX_FILES_DIR}/{name}"]
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        # Last: make the sandbox's own root read-only once everything above is mounted into it.
        return args + ["--remount-ro", "/", "--"]

    def _run_isolated(self, spec: RunSpec, *, slot: int, timeout_s: float) -> RawRun:
        uid = slot_uid(self.config, slot)
        fds: dict[str, int] = {}
        seccomp_fd = None
        try:
            for name, data in spec.files.items():
                _check_file_name(name)
                fds[name] = _memfd_with(data, name)
            if self._seccomp_bpf is not None:
                seccomp_fd = _memfd_with(self._seccomp_bpf, "seccomp")
            argv = [_substitute(a, SANDBOX_FILES_DIR, SANDBOX_SCRATCH_DIR) for a in spec.argv]
            as_root = self._as_root
            command = (self._limit_args(timeout_s, nproc=as_root) + self._setpriv_args(uid if as_root else None)
                       + self._bwrap_args(spec, fds, seccomp_fd) + argv)
            pass_fds = tuple(fds.values()) + ((seccomp_fd,) if seccomp_fd is not None else ())
            with self._spawn_lock:
                proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True,
                                        env={"PATH": _SANDBOX_PATH}, cwd="/")
                self._active_pids.add(proc.pid)
        finally:
            for fd in [*fds.values(), *([seccomp_fd] if seccomp_fd is not None else [])]:
                os.close(fd)
        try:
            captured = communicate_bounded(proc, stdin_bytes=spec.stdin, timeout_s=timeout_s,
                                           max_output_bytes=self.config.max_output_bytes,
                                           kill=lambda: _kill_group(proc.pid))
        finally:
            if proc.returncode is None:  # only on an exception: a reaped pid may already belong to someone else
                _kill_group(proc.pid)
                proc.wait()
            with self._spawn_lock:
                self._active_pids.discard(proc.pid)
            if as_root:
                sweep_uid(uid, reap=self._reap_orphans)
            else:
                self._reap_orphans()
        return _raw_run(proc, captured, isolated=True)

    def _reap_orphans(self) -> int:
        with self._spawn_lock:
            return reap_orphans(self._active_pids.__contains__)

    def _run_unsafe(self, spec: RunSpec, *, timeout_s: float) -> RawRun:
        with tempfile.TemporaryDirectory(prefix="betterai-unsafe-") as workdir:
            for name, data in spec.files.items():
                _check_file_name(name)
                with open(os.path.join(workdir, name), "wb") as handle:
                    handle.write(data)
            argv = [_substitute(a, workdir, workdir) for a in spec.argv]
            command = ((self._limit_args(timeout_s, nproc=False) if self._prlimit else [])
                       + (self._setpriv_args(None) if self._setpriv else []) + argv)
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd=workdir,
                                    env={"PATH": _SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
            try:
                captured = communicate_bounded(proc, stdin_bytes=spec.stdin, timeout_s=timeout_s,
                                               max_output_bytes=self.config.max_output_bytes,
                                               kill=lambda: _kill_group(proc.pid))
            finally:
                if proc.returncode is None:
                    _kill_group(proc.pid)
                    proc.wait()
        return _raw_run(proc, captured, isolated=False)


def _raw_run(proc: subprocess.Popen, captured, *, isolated: bool) -> RawRun:
    return RawRun(stdout=captured.stdout, stderr=captured.stderr, exit_code=proc.returncode,
                  timed_out=captured.timed_out, output_exceeded=captured.output_exceeded, wall_s=captured.wall_s,
                  started=captured.stdout.startswith(STARTED_MARKER), isolated=isolated)


def _substitute(arg: str, files_dir: str, scratch_dir: str) -> str:
    return arg.replace(FILES_PLACEHOLDER, files_dir).replace(SCRATCH_PLACEHOLDER, scratch_dir)


def _check_file_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"job file name {name!r} must be a plain file name")


def _memfd_with(data: bytes, name: str) -> int:
    """An anonymous in-memory file holding ``data``, positioned at its start (bwrap reads it from there)."""
    fd = os.memfd_create(f"betterai-{name}")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
