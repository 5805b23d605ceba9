"""Hostile programs are contained: each test checks the host afterwards, and that the pool still works.

Every test here runs a real program in the real sandbox (bubblewrap must be installed). "No process left
behind" is checked with an independent /proc scan over every uid the pool server may use.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import time

import pytest
from rewards_host_checks import (
    HEALTHY_JOB,
    SHARED_CONFIG,
    host_processes_with_uids,
    pool_uids,
    py_job,
    wait_until_no_processes,
)

from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.sandbox_config import SandboxConfig


def _uids(executor) -> set[int]:
    return pool_uids(executor.config, executor.pool.server_pid)


def _assert_host_clean_and_pool_healthy(executor) -> None:
    assert wait_until_no_processes(_uids(executor)) == [], "a sandboxed process outlived its run"
    verdict = executor.run([HEALTHY_JOB])[0]
    assert verdict.status == "passed", verdict


def _run_watching(executor, job, *, poll_s: float = 0.02):
    """Run ``job`` while sampling the host's processes of the pool's uids; returns (verdict, samples)."""
    uids = _uids(executor)
    future = executor.submit(job)
    samples = []
    while not future.done():
        samples.append(host_processes_with_uids(uids))
        time.sleep(poll_s)
    return future.result(), samples


def test_fork_bomb_is_capped_and_killed(executor):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    verdict, samples = _run_watching(executor, py_job(program))
    assert verdict.status == "timeout"
    peak = max(len(s) for s in samples)
    assert 3 <= peak <= executor.config.max_processes, f"peak {peak} processes"
    _assert_host_clean_and_pool_healthy(executor)


@pytest.fixture(scope="module")
def small_memory_executor():
    # 256 MiB of address space: a growing program hits it after touching little memory, so the test is quick.
    with CodeExecutor(SandboxConfig(**{**SHARED_CONFIG, "memory_mb": 256, "timeout_s": 10.0})) as executor:
        yield executor


@pytest.mark.parametrize("program", [
    "block = bytearray(16 * 1024 ** 3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n",
], ids=["one-huge-allocation", "growing"])
def test_memory_bomb_hits_the_address_space_limit(small_memory_executor, program):
    executor = small_memory_executor
    verdict = executor.run([py_job(program)])[0]
    assert verdict.status == "memory_limit", verdict  # stopped by the limit (MemoryError), not the clock
    _assert_host_clean_and_pool_healthy(executor)


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"],
                         ids=["busy-loop", "sleep"])
def test_runaway_program_is_killed_at_the_timeout(executor, program):
    start = time.monotonic()
    verdict = executor.run([py_job(program)])[0]
    elapsed = time.monotonic() - start
    assert verdict.status == "timeout"
    # killed by the clock, not run to its end (60 s of sleep, or forever); the slack covers sandbox start-up and
    # teardown on a loaded machine
    assert executor.config.timeout_s - 0.1 <= elapsed < executor.config.timeout_s + 10.0, elapsed
    _assert_host_clean_and_pool_healthy(executor)


def test_daemonized_child_does_not_outlive_the_run(executor):
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv('/usr/bin/sleep', ['sleep', '30'])\n"
        "    os._exit(0)\n"
        "time.sleep(1.0)\n"
        "def f(x):\n    return x + 1\n")
    verdict, samples = _run_watching(executor, py_job(program, tests=HEALTHY_JOB.tests))
    assert verdict.status == "passed", verdict  # the program itself finished normally
    sleepers = [pid for sample in samples for pid, _, _, name in sample if name == "sleep"]
    assert sleepers, "the daemon never started: the test would prove nothing"
    left = wait_until_no_processes(_uids(executor))
    assert left == [], f"daemon survived: {left}"
    _assert_host_clean_and_pool_healthy(executor)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_megabytes_of_output_are_capped(executor, stream):
    program = f"import sys\nsys.{stream}.write('x' * (64 * 1024 * 1024))\nsys.{stream}.flush()\n"
    verdict = executor.run([py_job(program)])[0]
    assert verdict.status == "output_limit", verdict  # killed at the cap, not at the timeout
    assert len(verdict.stdout) <= 4000 and len(verdict.stderr) <= 4000
    _assert_host_clean_and_pool_healthy(executor)


def test_cannot_reach_a_listener_on_host_loopback(executor):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    port = tcp.getsockname()[1]
    abstract_name = f"\0betterai-test-{secrets.token_hex(8)}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(abstract_name)
    unix.listen(8)
    program = (
        "import socket\n"
        "results = []\n"
        f"for family, address in ((socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET6, ('::1', {port})),\n"
        f"                        (socket.AF_UNIX, {abstract_name!r})):\n"
        "    try:\n"
        "        s = socket.socket(family, socket.SOCK_STREAM)\n"
        "        s.settimeout(1.0)\n"
        "        s.connect(address)\n"
        "        results.append('connected')\n"
        "    except OSError as exc:\n"
        "        results.append(type(exc).__name__)\n"
        "try:\n"
        "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"    u.sendto(b'hello', ('127.0.0.1', {port}))\n"
        "    results.append('udp-sent')\n"
        "except OSError as exc:\n"
        "    results.append(type(exc).__name__)\n"
        "print('NET', results)\n"
        "def f(x):\n    return x + 1\n")
    try:
        verdict = executor.run([py_job(program, tests=HEALTHY_JOB.tests)])[0]
        assert verdict.status == "passed", verdict
        assert "NET" in verdict.stdout and "connected" not in verdict.stdout and "udp-sent" not in verdict.stdout
        for listener in (tcp, unix):
            listener.settimeout(0.5)
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        tcp.close()
        unix.close()
    _assert_host_clean_and_pool_healthy(executor)


def test_cannot_write_or_delete_files_outside(executor, tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "keep.txt"
    victim.write_text("original")
    # Make them writable by anyone: only the sandbox stands between the program and these files.
    os.chmod(tmp_path, 0o777)
    os.chmod(victim_dir, 0o777)
    os.chmod(victim, 0o666)
    targets = [str(victim), str(victim_dir / "new.txt"), "/usr/bin/betterai-evil", "/betterai-evil",
               "/etc/betterai-evil", f"/proc/{os.getpid()}/cwd/betterai-evil"]
    program = (
        "import os\n"
        "outcomes = []\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as handle:\n"
        "            handle.write('pwned')\n"
        "        outcomes.append('wrote ' + path)\n"
        "    except OSError as exc:\n"
        "        outcomes.append(type(exc).__name__)\n"
        f"for path in ({str(victim)!r}, {str(victim_dir)!r}):\n"
        "    try:\n"
        "        os.remove(path) if path.endswith('.txt') else os.rmdir(path)\n"
        "        outcomes.append('removed ' + path)\n"
        "    except OSError as exc:\n"
        "        outcomes.append(type(exc).__name__)\n"
        "open('/tmp/inside.txt', 'w').write('fine')\n"  # the private tmpfs is writable
        "print('FILES', outcomes)\n"
        "def f(x):\n    return x + 1\n")
    try:
        verdict = executor.run([py_job(program, tests=HEALTHY_JOB.tests)])[0]
        assert verdict.status == "passed", verdict
        assert "FILES" in verdict.stdout and "wrote" not in verdict.stdout and "removed" not in verdict.stdout
        assert victim.read_text() == "original"
        assert sorted(os.listdir(victim_dir)) == ["keep.txt"]
        for path in ("/usr/bin/betterai-evil", "/betterai-evil", "/etc/betterai-evil", "betterai-evil"):
            assert not os.path.exists(path), path
    finally:
        for path in ("/usr/bin/betterai-evil", "/betterai-evil", "/etc/betterai-evil"):
            if os.path.exists(path):
                os.unlink(path)
    _assert_host_clean_and_pool_healthy(executor)


def test_cannot_read_host_secrets_or_environment(monkeypatch, tmp_path):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("BETTERAI_TEST_SECRET", secret)  # inherited by the sandbox server started below
    private = tmp_path / "secret.txt"
    private.write_text(secret)
    public = f"/tmp/betterai-test-secret-{secrets.token_hex(6)}"
    with open(public, "w") as handle:
        handle.write(secret)
    os.chmod(public, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)  # world-readable on the host
    program = (
        "import os\n"
        "print('ENV', dict(os.environ))\n"
        f"for path in ({str(private)!r}, {public!r}, '/proc/self/environ', '/proc/1/environ', '/proc/1/cmdline',\n"
        "             '/etc/shadow', '/root/.bash_history'):\n"
        "    try:\n"
        "        print('READ', path, open(path, 'rb').read()[:200])\n"
        "    except OSError as exc:\n"
        "        print('DENIED', path, type(exc).__name__)\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print('PIDS', len(pids))\n"
        "for pid in pids:\n"
        "    try:\n"
        "        print('PENV', pid, open('/proc/%s/environ' % pid, 'rb').read()[:300])\n"
        "    except OSError:\n"
        "        pass\n"
        "print('TMP', os.listdir('/tmp'))\n"
        "def f(x):\n    return x + 1\n")
    try:
        config = SandboxConfig(**SHARED_CONFIG)
        with CodeExecutor(config) as executor:
            verdict = executor.run([py_job(program, tests=HEALTHY_JOB.tests)])[0]
            assert verdict.status == "passed", verdict
            output = verdict.stdout + verdict.stderr
            assert len(verdict.stdout) < 3900, "output truncated: the check below would be incomplete"
            assert "ENV" in output and "PIDS" in output
            assert secret not in output
            visible = int(output.split("PIDS ", 1)[1].split()[0])
            assert visible <= 3, f"the sandbox sees {visible} processes"
            _assert_host_clean_and_pool_healthy(executor)
    finally:
        os.unlink(public)


def test_cannot_kill_the_parent_or_the_pool(executor):
    server_pid = executor.pool.server_pid
    starts = executor.pool.server_starts
    program = (
        "import os, signal\n"
        "outcomes = []\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, {server_pid}, {os.getppid()}, -1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        outcomes.append('sent')\n"
        "    except OSError as exc:\n"
        "        outcomes.append(type(exc).__name__)\n"
        "print('KILL', outcomes)\n"
        "def f(x):\n    return x + 1\n")
    verdict = executor.run([py_job(program, tests=HEALTHY_JOB.tests)])[0]
    assert verdict.status == "passed", verdict
    os.kill(server_pid, 0)  # raises if the sandbox server died
    assert executor.pool.server_pid == server_pid and executor.pool.server_starts == starts
    _assert_host_clean_and_pool_healthy(executor)
