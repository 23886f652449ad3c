"""Crash-safe checkpoints: the completion marker, what resume trusts, and rotation that never loses the last one."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from llmtrain.errors import StorageFull
from llmtrain.run.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problem,
    file_sha256,
    find_resume_checkpoint,
    reporting_full_disk,
    rotate,
    write_completion_marker,
)


def checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * step)
    if complete:
        write_completion_marker(folder, {"global_step": step, "world_size": 2})
    return folder


def test_marker_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, 7)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 7 and marker["world_size"] == 2
    shard = "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert set(marker["files"]) == {"trainer_state.json", shard}
    assert marker["files"][shard] == {"size": 7, "sha256": file_sha256(folder / shard)}
    assert not list(folder.glob(".*tmp"))


def test_missing_truncated_or_corrupted_files_make_a_checkpoint_incomplete(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, 8)
    assert checkpoint_problem(folder) is None
    shard = folder / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 8)  # same size, other bytes
    assert checkpoint_problem(folder) is None
    assert "checksum" in (checkpoint_problem(folder, verify_checksums=True) or "")
    shard.write_bytes(b"x")
    assert "has 1 bytes" in (checkpoint_problem(folder) or "")
    shard.unlink()
    assert "missing" in (checkpoint_problem(folder) or "")
    assert "no completion marker" in (checkpoint_problem(checkpoint(tmp_path, 9, complete=False)) or "")


def test_resume_skips_newer_incomplete_checkpoints(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 20, complete=False)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_rotation_never_deletes_the_last_complete_checkpoint_before_a_newer_one_is_complete(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 20, complete=False)  # a save in progress (or cut off)
    assert rotate(tmp_path, keep=1) == []
    assert (tmp_path / "checkpoint-10").is_dir() and (tmp_path / "checkpoint-20").is_dir()
    write_completion_marker(tmp_path / "checkpoint-20", {"global_step": 20})
    assert rotate(tmp_path, keep=1) == [tmp_path / "checkpoint-10"]


def test_rotation_keeps_the_newest_complete_and_clears_older_leftovers(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 25, complete=False)  # an interrupted save, older than the newest complete
    checkpoint(tmp_path, 40, complete=False)  # in progress: newer than every complete one
    deleted = rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-25"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert rotate(tmp_path, keep=None) == []


def test_a_write_failing_on_a_full_disk_becomes_one_clear_error(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    full = r"the disk is full: writing .*checkpoint-4 failed \(\[Errno 28\].*MiB free"
    with pytest.raises(StorageFull, match=full), reporting_full_disk(checkpoint):
        raise OSError(errno.ENOSPC, "No space left on device")
    # Any other failure with space to spare is not a full disk and stays what it is.
    with pytest.raises(RuntimeError, match="unrelated"), reporting_full_disk(checkpoint):
        raise RuntimeError("unrelated")
