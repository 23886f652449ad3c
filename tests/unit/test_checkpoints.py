"""Crash-safe checkpoints: the completion marker, what resume trusts, and rotation that never loses the last one."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
from pathlib import Path

import pytest

from llmtrain.errors import StorageFull
from llmtrain.run import completeness
from llmtrain.run.checkpoints import find_resume_checkpoint, reporting_full_disk, rotate
from llmtrain.run.completeness import COMPLETE_MARKER, checkpoint_problem, sha256_files, write_completion_marker

SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def checkpoint(output_dir: Path, step: int, complete: bool = True, checksums: bool = False) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / f"global_step{step}" / SHARD).write_bytes(b"o" * step)
    if complete:
        write_completion_marker(folder, {"global_step": step, "world_size": 2}, checksums=checksums)
    return folder


def test_marker_lists_every_file_with_its_size_and_no_checksum_by_default(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, 7)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 7 and marker["world_size"] == 2 and marker["checksums"] == "none"
    state_size = (folder / "trainer_state.json").stat().st_size
    assert marker["files"] == {"trainer_state.json": {"size": state_size}, f"global_step7/{SHARD}": {"size": 7}}
    assert not list(folder.glob(".*tmp"))


def test_marker_with_checksums_records_each_files_sha256_and_logs_the_cost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="llmtrain.run"):
        folder = checkpoint(tmp_path, 7, checksums=True)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["checksums"] == "sha256"
    for name, entry in marker["files"].items():
        content = (folder / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert f"SHA-256 of 2 files (0.00 GB) of {folder} computed in" in caplog.text


def test_missing_or_truncated_files_make_a_checkpoint_incomplete(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, 8)
    assert checkpoint_problem(folder) is None
    shard = folder / "global_step8" / SHARD
    shard.write_bytes(b"x")
    assert "has 1 bytes, the marker says 8" in (checkpoint_problem(folder, verify_checksums=True) or "")
    shard.unlink()
    assert "missing" in (checkpoint_problem(folder) or "")
    assert "no completion marker" in (checkpoint_problem(checkpoint(tmp_path, 9, complete=False)) or "")


@pytest.mark.parametrize("checksums", [False, True], ids=["sizes-only", "with-checksums"])
def test_a_flipped_byte_is_caught_only_where_checksums_were_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, checksums: bool
) -> None:
    checkpoint(tmp_path, 10, checksums=checksums)
    newest = checkpoint(tmp_path, 20, checksums=checksums)
    (newest / "global_step20" / SHARD).write_bytes(b"o" * 19 + b"x")  # same size, one byte changed
    assert checkpoint_problem(newest) is None  # sizes alone: nothing to see
    with caplog.at_level(logging.INFO, logger="llmtrain.run"):
        problem = checkpoint_problem(newest, verify_checksums=True)
        resume_from = find_resume_checkpoint(tmp_path)
    if not checksums:
        assert problem is None and resume_from == newest
        assert "SHA-256" not in caplog.text
        return
    assert f"global_step20/{SHARD} does not match its checksum" in (problem or "")
    assert resume_from == tmp_path / "checkpoint-10"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipping {newest}: {problem}"]
    assert f"SHA-256 of 2 files (0.00 GB) of {tmp_path / 'checkpoint-10'} checked in" in caplog.text
    assert rotate(tmp_path, keep=1) == [tmp_path / "checkpoint-10"]  # rotation checks sizes only


def test_rotation_reads_no_file_to_hash_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (10, 20):
        checkpoint(tmp_path, step, checksums=True)

    def no_hashing(*args: object, **kwargs: object) -> None:
        raise AssertionError("rotate hashed a file")

    monkeypatch.setattr(completeness, "sha256_files", no_hashing)
    assert rotate(tmp_path, keep=1) == [tmp_path / "checkpoint-10"]


def test_parallel_hashing_gives_the_same_digests_as_sequential(tmp_path: Path) -> None:
    chunk = 1 << 18  # hashlib.file_digest's read size: files around it and several of it
    sizes = [0, 1, chunk - 1, chunk, 3 * chunk + 17, 5000]
    paths = [tmp_path / f"file-{number}.bin" for number in range(len(sizes))]
    for number, (path, size) in enumerate(zip(paths, sizes, strict=True)):
        path.write_bytes(random.Random(number).randbytes(size))
    expected = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    assert sha256_files(paths, workers=1) == expected
    assert sha256_files(paths, workers=4) == expected
    assert sha256_files([]) == {}


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
