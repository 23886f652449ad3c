"""A preemption request sent to the training processes, not to the launcher.

Some schedulers, node agents and operators signal the training processes directly: ``kill`` of the
rank PIDs, or ``pkill python``, which also reaches DeepSpeed's per-node ``launch.py``. Every rank
finishes its step, saves a complete checkpoint and exits 75. launch.py, signalled itself, exits 1
(its own code is the first failing rank's only when it was not); either way the launcher reads the
codes the ranks recorded, reports 75 and never restarts the run (MAX_RESTARTS would otherwise resume
it: the attempt made progress).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from llmtrain.errors import PREEMPTED_EXIT_CODE
from llmtrain.run.completeness import checkpoint_problem

from ..conftest import REPO_ROOT, complete_steps, free_port, launch, wait_for_checkpoint

pytestmark = pytest.mark.slow


def job_pids(launcher_pid: int) -> list[int]:
    """The Python processes under the launcher: the ranks and DeepSpeed's per-node launch.py."""
    python = [c for c in psutil.Process(launcher_pid).children(recursive=True) if "python" in c.cmdline()[0]]
    ranks = [c for c in python if any(part.endswith("pretrain.py") for part in c.cmdline()) and "-m" not in c.cmdline()]
    assert len(ranks) == 2 and len(python) == 3, [c.cmdline()[:4] for c in python]  # launch.py, 2 ranks
    return [c.pid for c in python]


# SIGTERM to the ranks alone (launch.py then exits 75 itself) is test_exact_resume.py's
# test_sigterm_then_rerunning_the_same_command_is_bit_identical.
def test_sigterm_to_every_python_process_of_the_job_exits_75_without_a_restart(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true", "--report_to", "none",
        "--logging_steps", "2", "--eval_strategy", "no", "--save_steps", "4", "--max_steps", "200",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    console = tmp_path / "run.log"
    run = launch(command, tmp_path, console.name, NPROC="2", MASTER_PORT=str(free_port()), MAX_RESTARTS="2")
    wait_for_checkpoint(run, output_dir / "checkpoint-4", console)
    for pid in job_pids(run.pid):
        os.kill(pid, signal.SIGTERM)  # never the launcher: it must learn of the stop from the ranks

    assert run.wait(timeout=180) == PREEMPTED_EXIT_CODE, console.read_text()[-4000:]
    text = console.read_text()
    assert "exits with return code = 75" in text  # logged by the ranks (llmtrain.cli) and by DeepSpeed's launch.py
    assert "Main process received SIGTERM" in text  # launch.py was signalled too (and exits 1)
    last_line = text.rstrip().splitlines()[-1]
    assert last_line.startswith("launch: ") and "(exit 75)" in last_line, last_line
    assert "not retrying" in last_line and "rerun the same command to resume" in last_line, last_line
    assert "restart 1/" not in text
    steps = complete_steps(output_dir)
    assert steps and steps[-1] > 4, steps  # the signal's own checkpoint, after checkpoint-4
    assert checkpoint_problem(output_dir / f"checkpoint-{steps[-1]}", verify_checksums=True) is None
    assert not (output_dir / "model.safetensors").exists()
