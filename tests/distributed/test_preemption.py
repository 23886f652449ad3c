"""Preemption and restarts through pretrain.sh: SIGTERM saves and stops; a crashed rank is restarted; under
NNODES a lost node is reported within NODE_TIMEOUT_S and never waited for."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from llmtrain.errors import PREEMPTED_EXIT_CODE

from ..conftest import REPO_ROOT, free_port, kill_every_rank, launch, read_summary, wait, wait_for_checkpoint

pytestmark = pytest.mark.slow

STEPS = 16  # checkpoint-4 is written early, and a run killed after it still has steps left to resume


def command(output_dir: Path, *extra: str) -> list[str]:
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--disable_tqdm", "true", "--report_to", "none",
        "--logging_steps", "2", "--eval_strategy", "no", "--save_steps", "4", "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "4", *extra,
    ]  # fmt: skip


def worker_pids(launcher_pid: int) -> list[int]:
    children = psutil.Process(launcher_pid).children(recursive=True)
    return [
        c.pid for c in children if any(part.endswith("pretrain.py") for part in c.cmdline()) and "-m" not in c.cmdline()
    ]


def test_a_killed_rank_is_restarted_by_the_launcher_which_finishes_the_run(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    run = launch(command(output_dir), tmp_path, "run.log", NPROC="2", MASTER_PORT=str(free_port()), MAX_RESTARTS="1")
    wait_for_checkpoint(run, output_dir / "checkpoint-4", tmp_path / "run.log")
    os.kill(worker_pids(run.pid)[-1], signal.SIGKILL)  # one rank dies; the launcher is untouched
    output = wait(run, tmp_path, "run.log", timeout=600)
    assert "restart 1/1 resumes from step" in output
    summary = read_summary(output_dir)
    assert summary["global_step"] == STEPS and summary["resumed_from"] is not None
    assert json.loads((output_dir / "run_manifest.json").read_text())["global_step"] == STEPS


def test_a_crash_without_progress_is_not_retried(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    run = launch(command(output_dir, "--save_steps", "1000"), tmp_path, "run.log", NPROC="2",
                 MASTER_PORT=str(free_port()), MAX_RESTARTS="3")  # fmt: skip
    log = tmp_path / "run.log"
    deadline = time.monotonic() + 300
    while "'loss'" not in log.read_text(errors="replace"):  # training is under way
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.kill(worker_pids(run.pid)[-1], signal.SIGKILL)
    assert run.wait(timeout=300) != 0
    assert "no new complete checkpoint since this attempt began" in log.read_text()
    assert "restart 1/" not in log.read_text()


def test_two_nodes_under_torchrun_report_the_preemption_exit_code(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    port = str(free_port())
    nodes = [
        launch(command(output_dir), tmp_path, f"node{rank}.log", NNODES="2", NODE_RANK=str(rank), NPROC="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for rank in range(2)
    ]  # fmt: skip
    wait_for_checkpoint(nodes[0], output_dir / "checkpoint-4", tmp_path / "node0.log")
    for node in nodes:
        for pid in worker_pids(node.pid):
            os.kill(pid, signal.SIGTERM)
    # torchrun itself exits 1 on any worker failure; the launcher reads its workers' codes.
    for rank, node in enumerate(nodes):
        log = tmp_path / f"node{rank}.log"
        assert node.wait(timeout=180) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
        assert "exitcode  : 75" in log.read_text()


def test_a_lost_node_is_reported_within_node_timeout_and_not_waited_for(tmp_path: Path) -> None:
    timeout_s = 10
    output_dir = tmp_path / "out"
    port = str(free_port())
    nodes = [
        launch(command(output_dir), tmp_path, f"node{rank}.log", NNODES="2", NODE_RANK=str(rank), NPROC="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_TIMEOUT_S=str(timeout_s))
        for rank in range(2)
    ]  # fmt: skip
    log = tmp_path / "node0.log"
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / "data_ledger" / "rank-0.jsonl").is_file():  # both nodes train
            assert all(node.poll() is None for node in nodes), log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        node0_processes = psutil.Process(nodes[0].pid).children(recursive=True)
        # Node 1 hangs as a whole (a frozen host: its processes exist, nothing answers, no connection closes).
        frozen = [psutil.Process(nodes[1].pid), *psutil.Process(nodes[1].pid).children(recursive=True)]
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        while "launch: node 1 " not in log.read_text(errors="replace"):
            assert nodes[0].poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - frozen_at < timeout_s + 15, "no node-loss report within NODE_TIMEOUT_S"
            time.sleep(0.2)
        returncode = nodes[0].wait(timeout=2 * timeout_s + 30)  # its ranks cannot save without node 1: killed
        text = log.read_text()
        assert returncode not in (0, PREEMPTED_EXIT_CODE), text[-3000:]
        [report] = [line for line in text.splitlines() if line.startswith("launch: node 1 ")]
        assert "is lost: no heartbeat from its launcher" in report and "rerun the same command on every node" in report
        assert "restart 1/" not in text and text.rstrip().splitlines()[-1].startswith(f"launch: exit {returncode}")
        assert not [p for p in node0_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_every_rank(node)
