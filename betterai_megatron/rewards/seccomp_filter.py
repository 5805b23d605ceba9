"""The seccomp filter that bubblewrap installs on every sandboxed program (BPF built with libseccomp).

The filter allows everything an interpreter or compiler needs and makes a deny-list of system calls fail with
``EPERM``: kernel-attack surface that ordinary programs never use (``bpf``, ``perf_event_open``, ``userfaultfd``,
``io_uring_*``, ``keyctl``, module loading, ``kexec``), everything that inspects or changes other processes or the
system (``ptrace``, ``process_vm_*``, ``mount``, ``setns``, ``unshare``, clock and swap control, ``reboot``), the
terminal-injection ``ioctl(TIOCSTI)``, and sockets of any family but ``AF_UNIX`` (the sandbox has no network
interface besides its own loopback anyway; this also stops raw/netlink/packet sockets). Calls for a foreign
architecture (x32 / i386 ABI on x86-64) kill the process: libseccomp's default for a non-native arch.

Built with the system ``libseccomp.so.2`` through ``ctypes`` rather than hand-assembling BPF: libseccomp resolves
syscall numbers per architecture and emits the architecture check, which is where hand-written filters go wrong.
The Python bindings (``pyseccomp`` / ``python3-seccomp``) are not on PyPI in a maintained form, so the five C calls
are declared here. The BPF program is built once per process and cached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import termios
import threading

# From <seccomp.h>: actions and comparison operators.
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE = 1
_SCMP_CMP_EQ = 4


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


DENIED_SYSCALLS = (
    # other processes / the kernel's view of them
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # namespaces and mounts (bubblewrap already set ours up; nothing inside needs more)
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel attack surface rarely used by test programs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "lookup_dcookie", "fanotify_init", "open_by_handle_at", "name_to_handle_at",
    # system-wide state
    "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm", "vhangup", "personality",
    "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl", "move_pages", "migrate_pages",
)


class SeccompUnavailableError(RuntimeError):
    """libseccomp could not be loaded or refused the filter."""


class _ArgCmp(ctypes.Structure):
    # struct scmp_arg_cmp { unsigned int arg; enum scmp_compare op; scmp_datum_t datum_a, datum_b; }
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_LOCK = threading.Lock()
_CACHED_BPF: bytes | None = None


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailableError(
            f"libseccomp is not installed ({exc}); install the Debian package libseccomp2 or set "
            "sandbox.seccomp=false") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _add_rule(lib: ctypes.CDLL, ctx: int, name: str, conditions: list[_ArgCmp]) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a syscall on this architecture (e.g. _sysctl on new kernels' headers)
        return
    array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
    rc = lib.seccomp_rule_add_array(ctx, _scmp_act_errno(errno.EPERM), number, len(conditions), array)
    if rc != 0:
        raise SeccompUnavailableError(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")


def build_seccomp_bpf() -> bytes:
    """The compiled BPF program (``struct sock_filter[]``), as bubblewrap's ``--seccomp FD`` expects it."""
    global _CACHED_BPF
    with _LOCK:
        if _CACHED_BPF is not None:
            return _CACHED_BPF
        lib = _load_libseccomp()
        ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
        if not ctx:
            raise SeccompUnavailableError("seccomp_init failed")
        try:
            for name in DENIED_SYSCALLS:
                _add_rule(lib, ctx, name, [])
            # socket(domain != AF_UNIX, ...) and socketpair likewise: no network, no netlink, no raw sockets.
            not_unix = _ArgCmp(0, _SCMP_CMP_NE, socket.AF_UNIX, 0)
            _add_rule(lib, ctx, "socket", [not_unix])
            _add_rule(lib, ctx, "socketpair", [not_unix])
            # ioctl(fd, TIOCSTI, ...) pushes characters into a terminal's input queue (CVE-2017-5226);
            # bubblewrap's --new-session already blocks it, this makes it independent of the session.
            _add_rule(lib, ctx, "ioctl", [_ArgCmp(1, _SCMP_CMP_EQ, termios.TIOCSTI, 0)])
            fd = os.memfd_create("betterai-seccomp")
            try:
                rc = lib.seccomp_export_bpf(ctx, fd)
                if rc != 0:
                    raise SeccompUnavailableError(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
                os.lseek(fd, 0, os.SEEK_SET)
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        finally:
            lib.seccomp_release(ctx)
        _CACHED_BPF = b"".join(chunks)
        return _CACHED_BPF
