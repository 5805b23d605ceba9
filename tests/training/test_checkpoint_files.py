"""The checkpoint directory layout (Megatron-LM's): tracker, incomplete saves, keep_last pruning — on real files."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from betterai_megatron.training import checkpoint_files as files


def _make_iters(root, steps):
    for step in steps:
        (root / f"iter_{step:07d}").mkdir(parents=True)
        (root / f"iter_{step:07d}" / "common.pt").write_bytes(b"x")


def test_iteration_dir_has_megatron_lm_name(tmp_path):
    assert files.iteration_dir(tmp_path, 100).name == "iter_0000100"
    assert files.iteration_dir(tmp_path, 12345678).name == "iter_12345678"


def test_tracker_round_trip_and_megatron_format(tmp_path):
    assert files.read_tracker(tmp_path) is None
    files.write_tracker(tmp_path, 250)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "250"
    assert files.read_tracker(tmp_path) == 250
    assert [p.name for p in tmp_path.iterdir()] == ["latest_checkpointed_iteration.txt"], "no temp file left"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert files.read_tracker(tmp_path) == "release"


def test_corrupt_tracker_is_a_clear_error(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12abc")
    with pytest.raises(files.CheckpointError, match=r"latest_checkpointed_iteration.txt.*'12abc'"):
        files.read_tracker(tmp_path)


def test_tracker_naming_a_missing_directory_is_a_clear_error(tmp_path):
    files.write_tracker(tmp_path, 8)
    with pytest.raises(files.CheckpointError, match="iter_0000008 does not exist"):
        files.checkpoint_path(tmp_path, 8)


def _hammer_tracker(root, stop_at):
    for step in range(stop_at):
        files.write_tracker(root, step)


def test_tracker_is_never_seen_half_written(tmp_path):
    """A reader racing a writer sees a whole number every time (the rename is atomic)."""
    writer = multiprocessing.get_context("fork").Process(target=_hammer_tracker, args=(tmp_path, 200))
    files.write_tracker(tmp_path, 0)
    writer.start()
    seen = set()
    while writer.is_alive():
        seen.add(files.read_tracker(tmp_path))  # raises CheckpointError on a partial file
    writer.join()
    assert writer.exitcode == 0
    assert all(isinstance(v, int) for v in seen) and len(seen) > 1


def test_directories_newer_than_tracker_are_incomplete(tmp_path):
    _make_iters(tmp_path, [2, 4, 6])
    assert files.incomplete_steps(tmp_path) == [2, 4, 6], "no tracker: nothing ever committed"
    files.write_tracker(tmp_path, 4)
    assert files.saved_steps(tmp_path) == [2, 4, 6]
    assert files.incomplete_steps(tmp_path) == [6]
    assert files.checkpoint_path(tmp_path, files.read_tracker(tmp_path)).name == "iter_0000004"


def test_remove_incomplete_only_touches_uncommitted_steps(tmp_path):
    _make_iters(tmp_path, [2, 4, 6])
    files.write_tracker(tmp_path, 4)
    assert not files.remove_incomplete(tmp_path, 4)  # committed: never deleted by a re-save
    assert files.remove_incomplete(tmp_path, 6)
    assert files.saved_steps(tmp_path) == [2, 4]


@pytest.mark.parametrize("steps, latest, keep_last, expected", [
    ([2, 4, 6, 8], 8, 2, [2, 4]),
    ([2, 4, 6, 8], 8, 1, [2, 4, 6]),
    ([2, 4, 6, 8], 8, None, []),
    ([2, 4, 6, 8], 6, 2, [2]),  # 8 is newer than the tracker: an incomplete save, not pruned here
    ([4], 4, 3, []),
])
def test_steps_to_prune(steps, latest, keep_last, expected):
    assert files.steps_to_prune(steps, latest=latest, keep_last=keep_last) == expected


def test_prune_deletes_directories(tmp_path):
    _make_iters(tmp_path, [1, 2, 3])
    (tmp_path / "not_a_checkpoint").mkdir()
    assert files.prune(tmp_path, latest=3, keep_last=1) == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "not_a_checkpoint"]


def test_keep_last_zero_is_rejected():
    with pytest.raises(ValueError, match="keep_last=0"):
        files.steps_to_prune([1], latest=1, keep_last=0)
