"""Running the pipeline: stages in order, completion markers, skipping, resuming, signals, timings.

A stage is complete when ``<run.dir>/<stage>/COMPLETE`` exists. It is written (JSON: start and end time, wall and
CPU seconds, the stage's effective config) only after the stage's command exited 0 *and* the pipeline was not
interrupted meanwhile — a training stage stopped by SIGTERM saves a checkpoint and exits 0, and must not count as
done. A re-run skips complete stages without starting any process for them (it warns when the stage's config
changed since, naming the keys), and re-runs the first incomplete one, which resumes from its own checkpoint.

Signals: the stage's process runs in its own session, so a Ctrl-C in the terminal or a ``kill`` of the pipeline
reaches it only through the pipeline, which forwards SIGINT / SIGTERM / SIGUSR1 / SIGHUP (see
:class:`_SignalForwarder`) and then stops with exit status 128 + signal after the stage has exited. Training
stages answer SIGTERM by saving a checkpoint. If the pipeline itself is killed (SIGKILL), Linux sends SIGTERM to the stage's process
(``PR_SET_PDEATHSIG``), so no stage outlives the pipeline.

CPU seconds are the stage's children's user + system time (``RUSAGE_CHILDREN``: torchrun, its workers and their
sandboxed programs; the ``data`` stage runs in-process and counts this process's time): on a shared machine the
wall time says little, the CPU time says what the stage costs.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from betterai_megatron.config import Config, ConfigError, load_config, to_dict
from betterai_megatron.pipeline.pipeline_config import STAGES
from betterai_megatron.pipeline.stages import StageCommand, StagePaths, stage_commands, write_demo_data

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
IGNORED_FOR_FINGERPRINT = ("pipeline", "log")  # sections that do not change what a stage produces


class PipelineError(RuntimeError):
    """A stage failed (exit status, log path and the log's tail in the message)."""


class PipelineInterrupted(RuntimeError):
    """The pipeline received a signal while a stage ran; ``signum`` is that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class StageRecord:
    """What the pipeline knows about one stage after this run."""

    name: str
    # "done" (ran now) | "skipped" (complete before) | "not selected" | "complete (not selected)" | "failed" |
    # "interrupted"
    status: str
    seconds: float | None = None
    cpu_seconds: float | None = None
    finished_at: str | None = None
    marker: dict = field(default_factory=dict)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _SignalForwarder:
    """While active: record the first forwarded signal and pass every one on to the running stage.

    SIGTERM and SIGUSR1 (the preemption signals a trainer answers by saving a checkpoint) go straight to the
    worker processes when the stage runs under torchrun: torchrun would pass them on with ``killpg`` of each
    worker's process group, which also kills the processes a checkpoint save has forked, so the save in flight
    fails. The workers then exit 0 and torchrun with them. Other signals go to the stage's own process.
    """

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.distributed = False
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _targets(self, signum: int) -> list[int]:
        pid = self.process.pid
        if self.distributed and signum in (signal.SIGTERM, signal.SIGUSR1):
            import psutil

            try:
                workers = [child.pid for child in psutil.Process(pid).children()]
            except psutil.Error:
                workers = []
            if workers:
                return workers
        return [pid]

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        if self.process is None or self.process.poll() is not None:
            return
        for pid in self._targets(signum):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def run_stage_process(stage: StageCommand, *, nproc: int, omp_num_threads: int | None, log_path: Path,
                      forwarder: _SignalForwarder) -> int:
    """Run one stage's command with output appended to ``log_path``; returns its exit status."""
    command = stage.command_line(nproc=nproc)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_num_threads)
    print(f"[pipeline] {stage.name}: {shlex.join(command)}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent, env=env)
        forwarder.process, forwarder.distributed = process, stage.distributed
        try:
            return process.wait()
        finally:
            forwarder.process = None


def check_stage_configs(commands: dict[str, StageCommand], config_path: str, stages: list[str]) -> dict:
    """Load every selected stage's config (file + its overrides) before anything runs, so that a typo in
    ``pipeline.<stage>_overrides`` fails now and not after hours of pretraining; returns the flat configs."""
    flat = {}
    for name in stages:
        stage = commands.get(name)
        if stage is None:
            continue
        if stage.overrides is None:  # a stage with flags, not a config
            flat[name] = {"argv": shlex.join(stage.argv)}
            continue
        try:
            config = load_config(config_path, stage.overrides)
        except ConfigError as exc:
            raise ConfigError(f"stage {name!r} (its overrides: pipeline.{name}_overrides and the pipeline's own): "
                              f"{exc}") from exc
        flat[name] = _flatten({k: v for k, v in to_dict(config).items() if k not in IGNORED_FOR_FINGERPRINT})
    return flat


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_keys(before: dict, now: dict) -> list[str]:
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def _skip(name: str, paths: StagePaths, config_now: dict | None) -> StageRecord:
    try:
        marker = json.loads(paths.marker(name).read_text() or "{}")
    except json.JSONDecodeError:
        marker = {}
    changed = _changed_keys(marker["config"], config_now) if config_now and "config" in marker else []
    note = ""
    if changed:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        note = (f" -- WARNING: its config changed since ({shown}); delete {paths.stage(name)} to re-run it with "
                "the new values")
    print(f"[pipeline] {name}: complete (finished {marker.get('finished_at', '?')}), skipped{note}", flush=True)
    return StageRecord(name, "skipped", marker.get("seconds"), marker.get("cpu_seconds"), marker.get("finished_at"),
                       marker)


def run_pipeline(config: Config, config_path: str) -> dict[str, StageRecord]:
    """Run the selected stages in order, skipping complete ones; writes and prints the summary; returns the
    record of every stage."""
    from betterai_megatron.pipeline.summary import print_summary, summarize

    paths = StagePaths(Path(config.run.dir).resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    selected = config.pipeline.stages
    commands = stage_commands(config, config_path, paths)
    if "eval" in selected and not any(a.startswith("checkpoint.load_dir=") for a in commands["eval"].argv):
        raise ConfigError("pipeline.stages includes eval but no training stage (pretrain, sft, grpo) is selected "
                          f"or complete under {paths.root}: there is no checkpoint to evaluate")
    stage_configs = check_stage_configs(commands, config_path, selected)
    p = config.pipeline
    stage_configs["data"] = {"pipeline.demo_levels": p.demo_levels, "pipeline.demo_task_repeats": p.demo_task_repeats,
                             "pipeline.demo_stdlib_max_bytes": p.demo_stdlib_max_bytes, "train.seed": config.train.seed}
    records: dict[str, StageRecord] = {}
    try:
        for name in STAGES:
            if name not in selected:
                records[name] = StageRecord(name, "not selected")
                if paths.marker(name).exists():
                    records[name] = _skip(name, paths, None)
                    records[name].status = "complete (not selected)"
                continue
            if paths.marker(name).exists():
                records[name] = _skip(name, paths, stage_configs.get(name))
                continue
            try:
                records[name] = _run_one(name, config, commands, paths, stage_configs.get(name))
            except PipelineInterrupted:
                records[name] = StageRecord(name, "interrupted")
                raise
            except Exception:
                records[name] = StageRecord(name, "failed")
                raise
    finally:
        summary = summarize(paths, records)
        (paths.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return records


def _run_one(name: str, config: Config, commands: dict, paths: StagePaths, stage_config: dict | None) -> StageRecord:
    stage_dir = paths.stage(name)
    resuming = stage_dir.exists() and any(stage_dir.iterdir())
    stage_dir.mkdir(parents=True, exist_ok=True)
    if resuming:
        print(f"[pipeline] {name}: incomplete from an earlier run, running it again (training stages resume "
              "from their own checkpoint)", flush=True)
    started_at, start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    cpu_start = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF)
    with _SignalForwarder() as forwarder:
        if name == "data":
            print("[pipeline] data: writing the built-in corpus, SFT conversations and problem splits", flush=True)
            write_demo_data(config, paths)
            status = 0
        else:
            status = run_stage_process(commands[name], nproc=config.pipeline.nproc,
                                       omp_num_threads=config.pipeline.omp_num_threads,
                                       log_path=stage_dir / "stage.log", forwarder=forwarder)
    seconds = time.time() - start
    cpu_seconds = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF) - cpu_start
    if forwarder.received is not None:
        raise PipelineInterrupted(
            f"interrupted by {signal.Signals(forwarder.received).name} during stage {name!r} (exit {status}); "
            f"it is not marked complete: run the same command again to resume it", forwarder.received)
    if status != 0:
        log_path = stage_dir / "stage.log"
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise PipelineError(f"stage {name!r} failed (exit {status}); full log: {log_path}\n{tail}")
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    marker = {"stage": name, "started_at": started_at, "finished_at": finished_at, "seconds": round(seconds, 3),
              "cpu_seconds": round(cpu_seconds, 3), "config": stage_config}
    partial = paths.marker(name).with_suffix(".partial")
    partial.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(partial, paths.marker(name))  # atomic: a crash never leaves a half-written marker
    print(f"[pipeline] {name}: done in {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU", flush=True)
    return StageRecord(name, "done", seconds, cpu_seconds, finished_at, marker)
