"""Checkpoint directory layout on disk (Megatron-LM's), with no torch in it: names, the tracker file, pruning.

::

    <checkpoint.dir>/
        latest_checkpointed_iteration.txt    "100": the newest *complete* checkpoint (written last, atomically)
        iter_0000050/                        a dist_checkpointing (torch_dist) directory per saved step
        iter_0000100/
        iter_0000150/                        newer than the tracker: a save that never completed; ignored

The tracker is the commit point of a save. It is replaced (write a temporary file, fsync, ``os.replace``,
fsync the directory) only after every rank has finished writing ``iter_N/``, so a crash at any moment during
a save leaves the tracker naming the previous, complete checkpoint. Readers therefore trust only the tracker,
never the newest directory. Megatron-LM's tracker may also hold ``release``; that names ``release/``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
_ITER_DIR_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used (message names the path and what is wrong)."""


def iteration_dir(root: str | Path, step: int) -> Path:
    """``<root>/iter_0000100`` for step 100 (seven digits, as Megatron-LM names them)."""
    return Path(root) / f"iter_{step:07d}"


def read_tracker(root: str | Path) -> int | str | None:
    """The step the tracker names (``"release"`` for a release checkpoint), or None without a tracker."""
    path = Path(root) / TRACKER_FILENAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if text == "release":
        return text
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}") from None
    if step < 0:
        raise CheckpointError(f"{path}: negative iteration {step}")
    return step


def checkpoint_path(root: str | Path, tracked: int | str) -> Path:
    """The directory the tracker value names (it must exist)."""
    path = Path(root) / "release" if tracked == "release" else iteration_dir(root, int(tracked))
    if not path.is_dir():
        raise CheckpointError(f"{Path(root) / TRACKER_FILENAME} names {tracked}, but {path} does not exist")
    return path


def write_tracker(root: str | Path, step: int) -> None:
    """Point the tracker at ``step`` atomically: readers see the old or the new value, never a partial file."""
    root = Path(root)
    tmp = root / f".{TRACKER_FILENAME}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(f"{step}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / TRACKER_FILENAME)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's own data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def saved_steps(root: str | Path) -> list[int]:
    """Steps of every ``iter_N`` directory under ``root`` (complete or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _ITER_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def incomplete_steps(root: str | Path) -> list[int]:
    """``iter_N`` directories newer than the tracker (all of them when there is no tracker): saves that never
    committed. They are never loaded; a later save of the same step replaces them."""
    tracked = read_tracker(root)
    if tracked == "release":
        return []
    return [s for s in saved_steps(root) if tracked is None or s > tracked]


def steps_to_prune(steps: list[int], *, latest: int, keep_last: int | None) -> list[int]:
    """Which complete checkpoints to delete so that the ``keep_last`` newest ones up to ``latest`` remain.

    Directories newer than ``latest`` are not complete checkpoints and are not this function's business.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1 (or null to keep all)")
    complete = sorted(s for s in steps if s <= latest)
    return complete[:-keep_last] if len(complete) > keep_last else []


def prune(root: str | Path, *, latest: int, keep_last: int | None) -> list[int]:
    """Delete old complete checkpoints beyond ``keep_last`` (rank 0, after the tracker names ``latest``)."""
    removed = steps_to_prune(saved_steps(root), latest=latest, keep_last=keep_last)
    for step in removed:
        shutil.rmtree(iteration_dir(root, step), ignore_errors=True)
    return removed


def remove_incomplete(root: str | Path, step: int) -> bool:
    """Delete ``iter_<step>`` left by an earlier save that never committed, before saving that step again
    (stale shard files of another world size would otherwise sit next to the new ones)."""
    tracked = read_tracker(root)
    path = iteration_dir(root, step)
    if path.exists() and (tracked is None or tracked == "release" or step > int(tracked)):
        shutil.rmtree(path)
        return True
    return False
