"""The output-dir lock: one holder at a time, the holder named on refusal, stale locks taken over safely.

Other launches are simulated by lock files written the way another process writes them (a live
pid of this host, a dead pid, another host), with their heartbeat set through the file's mtime.
Real concurrent processes are in ``tests/integration/test_output_dir_lock.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from llmtrain.config.arguments import TrainArguments
from llmtrain.errors import ConfigError
from llmtrain.run import lock as lock_module
from llmtrain.run.lock import (
    LOCK_FILE,
    STALE_AFTER_S,
    OutputDirLock,
    check_not_held,
    read_holder,
    take_over,
    this_host,
)
from llmtrain.run.output_dir import RUN_CONFIG_FILE, inspect_output_dir, open_output_dir

RUN = {"learning_rate": 1e-3, "block_size": 64}
STARTED = "2026-11-30T01:02:03+00:00"


@pytest.fixture
def lock_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / LOCK_FILE
    yield path
    for handle in list(lock_module._HELD_HERE.values()):  # no heartbeat thread outlives its test
        handle.release()


def forge_lock(path: Path, pid: int, host: str | None = None, age_s: float = 0.0, run_id: str = "other-run") -> None:
    """A lock file as another process writes it; ``host=None`` means this host, ``age_s`` its heartbeat's age."""
    hostname, namespace = this_host()
    record = {
        "host": host or hostname, "pid": pid, "pid_namespace": "" if host else namespace, "started": STARTED,
        "run_id": run_id, "token": f"forged-{pid}",
    }  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    set_heartbeat_age(path, age_s)


def set_heartbeat_age(path: Path, age_s: float) -> None:
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def dead_pid() -> int:
    """A pid no process has on this host right now."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def live_other_pid() -> int:
    """A live process of this host that is not this one (pytest's parent)."""
    return os.getppid()


def train_args(output_dir: Path, **overrides: object) -> TrainArguments:
    return TrainArguments(output_dir=str(output_dir), use_cpu=True, **overrides)  # type: ignore[arg-type]


def test_acquire_records_the_holder_and_release_deletes_the_file(lock_path: Path) -> None:
    lock = OutputDirLock(lock_path).acquire(run_id="run-1")
    record = json.loads(lock_path.read_text())
    assert (record["host"], record["pid"], record["run_id"]) == (this_host()[0], os.getpid(), "run-1")
    assert abs(datetime.fromisoformat(record["started"]).timestamp() - time.time()) < 60
    assert lock.held
    lock.release()
    assert not lock_path.exists() and not lock.held
    lock.release()  # idempotent
    OutputDirLock(lock_path).release()  # never acquired: nothing to do
    assert not lock_path.exists()


@pytest.mark.parametrize("host", [None, "node-elsewhere"], ids=["live-pid-this-host", "fresh-heartbeat-other-host"])
def test_a_live_holder_refuses_a_second_acquire_naming_itself(lock_path: Path, host: str | None) -> None:
    pid = live_other_pid()
    forge_lock(lock_path, pid, host=host, age_s=STALE_AFTER_S - 30)
    before = lock_path.read_bytes()
    holder_host = host or this_host()[0]
    expected = re.escape(
        f"in use by another launch: host {holder_host}, pid {pid}, started {STARTED}, run id other-run"
    )
    with pytest.raises(ConfigError, match=expected) as refused:
        OutputDirLock(lock_path).acquire()
    message = str(refused.value)
    assert str(lock_path) in message and "Wait for that run to finish" in message and "delete" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=expected):
        check_not_held(lock_path)
    assert lock_path.read_bytes() == before  # the holder's lock is untouched


def test_a_lock_left_by_a_dead_pid_of_this_host_is_taken_over_at_once(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    forge_lock(lock_path, pid)  # heartbeat fresh: the dead pid alone makes it stale
    check_not_held(lock_path)  # inspecting passes: the launch will take the lock over
    caplog.set_level(logging.WARNING, logger="llmtrain.run.lock")
    lock = OutputDirLock(lock_path).acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getpid() and lock.held
    assert f"taking over the stale lock {lock_path}" in caplog.text
    assert f"pid {pid} is no longer running" in caplog.text
    assert not list(lock_path.parent.glob(f"{LOCK_FILE}.stale-*"))  # the stale file was removed, not left aside


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_is_older_than_the_threshold(
    lock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forge_lock(lock_path, dead_pid(), host="node-elsewhere", age_s=STALE_AFTER_S - 30)
    with pytest.raises(ConfigError, match="host node-elsewhere"):  # its pid says nothing here: another host
        OutputDirLock(lock_path).acquire()
    set_heartbeat_age(lock_path, STALE_AFTER_S + 30)
    caplog.set_level(logging.WARNING, logger="llmtrain.run.lock")
    OutputDirLock(lock_path).acquire()
    assert json.loads(lock_path.read_text())["host"] == this_host()[0]
    assert "no heartbeat for 150 s" in caplog.text


def test_a_live_pid_that_stopped_refreshing_the_heartbeat_is_a_reused_pid(lock_path: Path) -> None:
    forge_lock(lock_path, live_other_pid(), age_s=STALE_AFTER_S + 30)
    check_not_held(lock_path)
    OutputDirLock(lock_path).acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()


def test_a_lock_naming_this_process_that_it_did_not_write_is_stale(lock_path: Path) -> None:
    forge_lock(lock_path, os.getpid())  # e.g. a container restarted with the same hostname and pid
    OutputDirLock(lock_path).acquire()
    assert json.loads(lock_path.read_text())["token"] != f"forged-{os.getpid()}"


def test_an_unreadable_lock_file_is_live_until_its_heartbeat_is_old(lock_path: Path) -> None:
    lock_path.write_text("")  # a holder killed between creating the file and writing it, or still writing
    with pytest.raises(ConfigError, match="an unknown process"):
        OutputDirLock(lock_path).acquire()
    set_heartbeat_age(lock_path, STALE_AFTER_S + 1)
    assert OutputDirLock(lock_path).acquire().held


def test_the_heartbeat_refreshes_the_mtime(lock_path: Path) -> None:
    OutputDirLock(lock_path, heartbeat_interval_s=0.05).acquire()
    set_heartbeat_age(lock_path, STALE_AFTER_S + 30)
    deadline = time.monotonic() + 5
    while time.time() - lock_path.stat().st_mtime > 5:
        assert time.monotonic() < deadline, "the heartbeat did not refresh the lock file"
        time.sleep(0.02)
    check_not_held(lock_path)  # held by this process: never a conflict


def test_of_two_takeovers_of_one_stale_lock_only_the_first_wins(lock_path: Path) -> None:
    forge_lock(lock_path, dead_pid())
    stale = read_holder(lock_path)
    assert stale is not None
    # Both launches judged the same file stale; the first takes it over and locks.
    assert take_over(lock_path, stale)
    winner = OutputDirLock(lock_path).acquire()
    # The second one's rename now moves the winner's fresh lock: it must notice and put it back.
    assert not take_over(lock_path, stale)
    assert winner.held and json.loads(lock_path.read_text())["token"] == winner.record["token"]
    assert not list(lock_path.parent.glob(f"{LOCK_FILE}.stale-*"))
    # The second one came after the file was moved but before the winner created its own: nothing to take.
    winner.release()
    forge_lock(lock_path, dead_pid())
    stale = read_holder(lock_path)
    assert stale is not None and take_over(lock_path, stale)
    assert not take_over(lock_path, stale)


def test_of_many_concurrent_takeovers_of_one_stale_lock_exactly_one_succeeds(lock_path: Path) -> None:
    forge_lock(lock_path, dead_pid())
    stale = read_holder(lock_path)
    assert stale is not None
    start = threading.Barrier(8)
    results: list[bool] = []

    def racer() -> None:
        start.wait()
        results.append(take_over(lock_path, stale))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert list(lock_path.parent.iterdir()) == []


def test_release_leaves_a_lock_that_another_launch_took_over_alone(lock_path: Path) -> None:
    lock = OutputDirLock(lock_path).acquire()
    lock_path.rename(lock_path.with_name("taken-aside"))  # what a takeover does to a lock judged stale
    forge_lock(lock_path, live_other_pid())
    assert not lock.held
    lock.release()
    assert json.loads(lock_path.read_text())["pid"] == live_other_pid()


def test_the_release_is_registered_with_atexit(lock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    monkeypatch.setattr(lock_module.atexit, "register", registered.append)
    lock = OutputDirLock(lock_path).acquire()
    assert registered == [lock.release]
    exit_handler = registered[0]
    assert callable(exit_handler)
    exit_handler()  # what the interpreter does at exit when the entry point did not release
    assert not lock_path.exists()
    lock.release()  # and the entry point's own release afterwards is harmless


def test_opening_the_same_output_dir_again_in_one_process_hands_the_lock_over(lock_path: Path) -> None:
    first = OutputDirLock(lock_path).acquire()
    second = OutputDirLock(lock_path).acquire()
    assert second.held and not first.held
    first.release()
    assert lock_path.exists()
    second.release()
    assert not lock_path.exists()


def test_inspect_output_dir_refuses_an_output_dir_held_by_a_live_launch(tmp_path: Path) -> None:
    forge_lock(tmp_path / LOCK_FILE, live_other_pid())
    with pytest.raises(ConfigError, match=re.escape(f"pid {live_other_pid()}, started {STARTED}")):
        inspect_output_dir(train_args(tmp_path), RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_open_output_dir_refuses_when_another_launch_locked_first_and_writes_nothing(tmp_path: Path) -> None:
    args = train_args(tmp_path / "out")
    start = inspect_output_dir(args, RUN)  # nothing there yet
    (tmp_path / "out").mkdir()
    forge_lock(tmp_path / "out" / LOCK_FILE, live_other_pid())  # the other launch won the race since
    with pytest.raises(ConfigError, match=rf"in use by another launch: host \S+, pid {live_other_pid()}"):
        open_output_dir(args, RUN, start)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_FILE]


def test_open_output_dir_locks_before_it_writes_and_start_over_keeps_the_lock(tmp_path: Path) -> None:
    forge_lock(tmp_path / LOCK_FILE, dead_pid())  # left by a crashed earlier launch
    (tmp_path / RUN_CONFIG_FILE).write_text(yaml.safe_dump({**RUN, "learning_rate": 5e-4}))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    args = train_args(tmp_path, start_over=True)
    lock = open_output_dir(args, RUN, inspect_output_dir(args, RUN))
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    (archived,) = (tmp_path / "previous").iterdir()
    assert LOCK_FILE not in {p.name for p in archived.iterdir()}
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_other_ranks_get_a_handle_that_holds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = train_args(tmp_path)
    monkeypatch.setattr(TrainArguments, "should_save", property(lambda self: False))
    lock = open_output_dir(args, RUN, inspect_output_dir(args, RUN))
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()
    lock.release()


def test_an_output_dir_under_a_regular_file_has_no_lock_to_read(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    assert read_holder(tmp_path / "a-file" / "out" / LOCK_FILE) is None  # the writability check reports it
    with pytest.raises(ConfigError, match="cannot create the output dir lock"):
        OutputDirLock(tmp_path / "a-file" / LOCK_FILE).acquire()
