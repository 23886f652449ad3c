"""Per-launch overhead: seconds from ``bash pretrain.sh`` to the first rank's first training step, before vs after.

    python -m bench.launch_overhead [--runs 3] [--before REV]

* **before**: the bash launcher (``scripts/launch.sh``, ``scripts/topology.sh``, ``scripts/output_dir.py``:
  its preflight a Python process of its own, before the job starts) as of ``REV`` (default: HEAD if
  it still has it, else the last commit that did), the whole checkout at that commit extracted with
  ``git archive`` into a temporary directory (nothing in this checkout or its ``.git`` changes);
* **after**: this checkout's ``python -m llmtrain.launch`` (the preflight in its own process, beside
  the job's start).

Both run the tiny default as a user first runs it (``bash pretrain.sh``, preflight on, one CPU rank),
with this checkout's ``.venv`` Python as ``PYTHON``, a warm dataset cache of their own, and
``--max_steps 1 --save_strategy no --eval_strategy no --report_to none``. A run is timed from its start
to the first line of ``data_ledger/rank-0.jsonl``, which the rank writes at the end of its first
optimizer step. One untimed run per side first warms the caches; then the sides alternate (before,
after, before, ...) so a noisy neighbour slows both. Reported: the median of the paired ratios (each
after run over the before run just ahead of it, which saw about the same load), and both medians.
Target: <= 0.6.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, Result, median, print_result

BASH_LAUNCHER = "scripts/launch.sh"
TARGET = 0.6
FIRST_STEP_TIMEOUT_S = 300


def bash_launcher_revision() -> str:
    """HEAD when it still has the bash launcher, else the parent of the commit that removed it."""
    git = ["git", "-C", str(REPO_ROOT)]
    if subprocess.run([*git, "cat-file", "-e", f"HEAD:{BASH_LAUNCHER}"], capture_output=True).returncode == 0:
        return subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    removed = subprocess.run([*git, "rev-list", "-1", "HEAD", "--", BASH_LAUNCHER], capture_output=True, text=True)
    return f"{removed.stdout.strip()[:9]}^"


def extract(rev: str, into: Path) -> Path:
    """The checkout at ``rev``, written under ``into`` (``git archive``: no worktree, no change to .git)."""
    archive = into / "before.tar"
    with archive.open("wb") as file:
        subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev], stdout=file, check=True)
    root = into / "before"
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return root


def time_to_first_step(checkout: Path, work: Path, cache: Path) -> float:
    """Seconds from ``bash <checkout>/pretrain.sh`` to the first ledger line; the run is then let finish."""
    output_dir = work / "out"
    shutil.rmtree(output_dir, ignore_errors=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SWANLAB_", "PYTEST_"))}
    for name in ("NPROC", "NUM_GPUS", "HOSTFILE", "NNODES", "SKIP_DOCTOR", "DRY_RUN"):
        env.pop(name, None)
    env.update(PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MASTER_PORT=str(_free_port()))
    command = [
        "bash", str(checkout / "pretrain.sh"), "--output_dir", str(output_dir), "--dataset_cache_dir", str(cache),
        "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
    ]  # fmt: skip
    ledger = output_dir / "data_ledger" / "rank-0.jsonl"
    with (work / "launch.log").open("wb") as log:
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        while not (ledger.is_file() and ledger.stat().st_size > 0):
            if process.poll() is not None:
                tail = (work / "launch.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{checkout}/pretrain.sh ended with {process.returncode} before its first step:\n{tail}"
                )
            if time.perf_counter() - began > FIRST_STEP_TIMEOUT_S:
                process.kill()
                raise RuntimeError(f"no first step within {FIRST_STEP_TIMEOUT_S} s; see {work / 'launch.log'}")
            time.sleep(0.01)
        seconds = time.perf_counter() - began
        if process.wait(timeout=FIRST_STEP_TIMEOUT_S) != 0:
            raise RuntimeError(f"{checkout}/pretrain.sh failed; see {work / 'launch.log'}")
    return seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(runs: int = 3, before_rev: str | None = None) -> Result:
    before_rev = before_rev or bash_launcher_revision()
    with tempfile.TemporaryDirectory(prefix="launch-bench-") as temporary:
        root = Path(temporary)
        sides = {"before": extract(before_rev, root), "after": REPO_ROOT}
        work = {name: root / f"work-{name}" for name in sides}
        cache = {name: root / f"cache-{name}" for name in sides}
        for name, checkout in sides.items():
            work[name].mkdir()
            time_to_first_step(checkout, work[name], cache[name])  # warm-up: caches, page cache
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(runs):
            for name, checkout in sides.items():
                seconds[name].append(time_to_first_step(checkout, work[name], cache[name]))
    before, after = median(seconds["before"]), median(seconds["after"])
    paired = [python_run / bash_run for bash_run, python_run in zip(seconds["before"], seconds["after"], strict=True)]
    return Result(
        name="launch overhead (bash pretrain.sh -> first step, tiny default, 1 CPU rank, preflight on)",
        ratio=median(paired),
        target=TARGET,
        higher_is_better=False,
        detail={
            "before (bash launcher) median s": round(before, 2),
            "after (python launcher) median s": round(after, 2),
            "ratio of the medians": round(after / before, 3),
            "paired ratios (after / the before run just ahead of it)": [round(value, 3) for value in paired],
            "before runs s": [round(value, 2) for value in seconds["before"]],
            "after runs s": [round(value, 2) for value in seconds["after"]],
            "before revision": before_rev,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side, alternating")
    parser.add_argument("--before", help="the revision with the bash launcher (default: see the module docstring)")
    args = parser.parse_args()
    print_result(run(args.runs, args.before))


if __name__ == "__main__":
    main()
