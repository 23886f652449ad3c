"""One launch per output dir, with real processes: a second ``pretrain.py`` is refused at once while the
first trains, and the lock a SIGKILLed run leaves behind is taken over by its rerun.

The first launch is paused (SIGSTOP) while the second one starts, so the two overlap however fast or
slow this machine is; a paused holder is alive, so its lock must hold. The killed run and its rerun
use a second output dir and overlap with the first pair to keep the whole under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmtrain.errors import USER_ERROR_EXIT_CODE
from llmtrain.run.lock import LOCK_FILE

from ..conftest import (
    REPO_ROOT,
    kill_every_rank,
    launch,
    prose_records,
    subprocess_env,
    wait,
    wait_for_checkpoint,
    write_jsonl,
)

STEPS = 24  # ~2 s of steps after checkpoint-2 on an idle 2-core machine: the pause lands while it trains


def pretrain_command(tmp: Path, corpus: Path, output_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "pretrain.py"), "--train_files", str(corpus), "--output_dir", str(output_dir),
        "--report_to", "none", "--use_cpu", "true", "--dataset_cache_dir", str(tmp / f"cache-{output_dir.name}"),
        "--block_size", "64", "--per_device_train_batch_size", "2", "--eval_strategy", "no",
        "--max_steps", str(steps), "--save_steps", "2",
    ]  # fmt: skip


def test_a_second_launch_is_refused_while_the_first_trains_and_a_killed_runs_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", prose_records(120))
    first_dir, killed_dir = tmp_path / "out", tmp_path / "killed"
    command = pretrain_command(tmp_path, corpus, first_dir, STEPS)
    killed_command = pretrain_command(tmp_path, corpus, killed_dir, 3)
    first = launch(command, tmp_path, "first.log")
    killed = launch(killed_command, tmp_path, "killed.log", LLMTRAIN_FAULT="kill_after_step=1")
    processes = [first, killed]
    try:
        # The first run trains: it has saved a checkpoint. Pause it mid-run, as soon as it has, and read its lock.
        wait_for_checkpoint(first, first_dir / "checkpoint-2", tmp_path / "first.log", timeout=180)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            holder = json.loads((first_dir / LOCK_FILE).read_text())
            assert (holder["host"], holder["pid"]) == (socket.gethostname(), first.pid)
            began = time.monotonic()
            second = launch(command, tmp_path, "second.log")
            processes.append(second)
            returncode = second.wait(timeout=120)
            refused_after = time.monotonic() - began
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        second_log = (tmp_path / "second.log").read_text()
        assert returncode == USER_ERROR_EXIT_CODE, second_log[-3000:]
        errors = [line for line in second_log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, second_log[-3000:]
        for detail in (f"host {holder['host']}", f"pid {first.pid}", f"started {holder['started']}", str(first_dir)):
            assert detail in errors[0], (detail, errors[0])
        assert f"lock file {first_dir / LOCK_FILE}" in errors[0]
        assert "Traceback" not in second_log
        assert "pretraining data:" not in second_log, "refused only after building the data"
        assert refused_after < 90, f"refused only after {refused_after:.0f} s"  # imports, then the lock

        # The killed run died without cleanup; its rerun (no restart delay) must take its lock over.
        assert killed.wait(timeout=180) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
        left = json.loads((killed_dir / LOCK_FILE).read_text())
        assert left["pid"] == killed.pid
        rerun = launch(killed_command, tmp_path, "rerun.log")
        processes.append(rerun)

        # The first run is unharmed: it finishes, every step in its ledger once, its lock released.
        wait(first, tmp_path, "first.log", timeout=180)
        ledger = (first_dir / "data_ledger" / "rank-0.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in ledger] == list(range(1, STEPS + 1))
        assert json.loads((first_dir / "train_summary.json").read_text())["global_step"] == STEPS
        assert not (first_dir / LOCK_FILE).exists()

        rerun_log = wait(rerun, tmp_path, "rerun.log", timeout=180)
        takeover = [line for line in rerun_log.splitlines() if "taking over the stale lock" in line]
        assert len(takeover) == 1 and " WARNING " in takeover[0], rerun_log[-3000:]
        assert f"pid {killed.pid}" in takeover[0] and "is no longer running" in takeover[0]
        assert json.loads((killed_dir / "train_summary.json").read_text())["global_step"] == 3
        assert not (killed_dir / LOCK_FILE).exists()
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)
                kill_every_rank(process)


HOLD = """
import sys, time
from pathlib import Path
from llmtrain.run.lock import OutputDirLock
lock = OutputDirLock(Path(sys.argv[1]))
Path(sys.argv[2]).touch()
while not Path(sys.argv[2]).with_suffix(".go").exists():
    time.sleep(0.01)
try:
    lock.acquire(run_id=sys.argv[3])
except Exception as error:
    print(error)
    sys.exit(2)
print("locked")
{end}
"""


def hold(tmp_path: Path, lock_path: Path, name: str, end: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD.format(end=end), str(lock_path), str(tmp_path / f"{name}.ready"), name],
        env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def start_together(tmp_path: Path, names: list[str]) -> None:
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{name}.ready").exists() for name in names):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.01)
    for name in names:
        (tmp_path / f"{name}.go").touch()


def recorded_pid(lock_path: Path) -> int | None:
    """The pid a lock file records, or None while it is missing or not yet written whole."""
    try:
        return int(json.loads(lock_path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_of_four_processes_racing_for_a_killed_holders_lock_exactly_one_wins(tmp_path: Path) -> None:
    lock_path = tmp_path / LOCK_FILE
    holder = hold(tmp_path, lock_path, "holder", end="time.sleep(600)")
    start_together(tmp_path, ["holder"])
    deadline = time.monotonic() + 60
    while recorded_pid(lock_path) != holder.pid:
        # until the holder has created the file and written its record (a kill in between is another case)
        assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()[0]
        time.sleep(0.01)
    holder.kill()  # SIGKILL: no atexit, the lock file stays
    holder.wait(timeout=30)
    assert json.loads(lock_path.read_text())["pid"] == holder.pid

    names = [f"racer{i}" for i in range(4)]
    racers = [hold(tmp_path, lock_path, name, end="sys.stdout.flush(); time.sleep(30)") for name in names]
    try:
        start_together(tmp_path, names)
        deadline = time.monotonic() + 60
        while sum(racer.poll() is not None for racer in racers) < 3:
            assert time.monotonic() < deadline, "the losers were not refused"
            time.sleep(0.05)
        winners = [racer for racer in racers if racer.poll() is None]
        assert len(winners) == 1
        assert json.loads(lock_path.read_text())["pid"] == winners[0].pid
        for loser in racers:
            if loser is not winners[0]:
                output = loser.communicate()[0]
                assert loser.returncode == 2 and f"pid {winners[0].pid}" in output, output
        assert not list(tmp_path.glob(f"{LOCK_FILE}.stale-*"))
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()


def test_a_process_that_exits_without_releasing_leaves_no_lock_and_os_exit_leaves_a_stale_one(
    tmp_path: Path,
) -> None:
    lock_path = tmp_path / LOCK_FILE
    normal = hold(tmp_path, lock_path, "normal", end="sys.exit(0)")  # release left to atexit
    start_together(tmp_path, ["normal"])
    assert normal.wait(timeout=60) == 0 and "locked" in normal.communicate()[0]
    assert not lock_path.exists()

    abrupt = hold(tmp_path, lock_path, "abrupt", end="import os; os._exit(0)")
    start_together(tmp_path, ["abrupt"])
    assert abrupt.wait(timeout=60) == 0
    assert json.loads(lock_path.read_text())["pid"] == abrupt.pid
    again = hold(tmp_path, lock_path, "again", end="sys.exit(0)")
    start_together(tmp_path, ["again"])
    assert again.wait(timeout=60) == 0 and "locked" in again.communicate()[0]
