"""Fixtures of the multi-process tests: one uninterrupted 2-rank pretraining run that every exact-resume
comparison of pretraining shares, and two ssh hosts on loopback for the HOSTFILE launches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT, built_once, free_port, launch, wait

# The pretraining command of every exact-resume comparison (test_exact_resume.py, test_interruptions.py): 2 CPU
# ranks, ZeRO-2, fp32, gradient accumulation 2 of 4 blocks each, 2 loader workers, checkpoints at steps 3, 6, 9
# and the last. Half the tiny default's batch: the cost of these runs is in their tokens, their proof is not.
REFERENCE_STEPS = 10
REFERENCE_SAVE_STEPS = 3


def pretrain_reference_command(output_dir: Path) -> list[str]:
    """``bash pretrain.sh`` on the tiny default; its dataset cache is shared by every run beside ``output_dir``."""
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--disable_tqdm", "true", "--report_to", "none",
        "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", str(REFERENCE_SAVE_STEPS),
        "--max_steps", str(REFERENCE_STEPS), "--gradient_accumulation_steps", "2", "--dataloader_num_workers", "2",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def pretrain_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of :func:`pretrain_reference_command` on 2 ranks, with the launcher's preflight;
    interrupted runs of the same command write their output dirs beside it and must end bit-identical to it.
    Built once per session, whichever worker needs it first (:func:`tests.conftest.built_once`)."""

    def build(directory: Path) -> Path:
        output_dir = directory / "reference"
        process = launch(pretrain_reference_command(output_dir), directory, "reference.log", NPROC="2",
                         MASTER_PORT=str(free_port()), SKIP_DOCTOR="0")  # fmt: skip
        output = wait(process, directory, "reference.log", timeout=600)
        assert "doctor: ok" in output and "doctor: 0 error(s)" in output  # the launcher's preflight ran first
        return output_dir

    return built_once(tmp_path_factory, "pretrain-reference", build)


SSH_DIR_VARIABLE = "LLMTRAIN_TEST_SSH_DIR"  # set by .ci/run, which starts sshd itself
LOOPBACK_HOSTS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="session")
def loopback_ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory whose ``bin/ssh`` logs in to 127.0.0.2 and 127.0.0.3 (this machine) without a password.

    Put ``bin`` first on PATH: DeepSpeed's runner and pdsh then use it. Skipped, with the reason, where
    sshd, pdsh or a loopback sshd cannot be had (``tests/loopback_ssh.sh`` says how it is set up).
    """
    missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").is_file():
        missing.append("sshd")
    if os.environ.get(SSH_DIR_VARIABLE):
        yield Path(os.environ[SSH_DIR_VARIABLE])
        return
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server pdsh) for two loopback ssh hosts")
    directory = tmp_path_factory.mktemp("loopback-ssh")
    script = REPO_ROOT / "tests" / "loopback_ssh.sh"
    started = subprocess.run(
        ["bash", str(script), "start", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if started.returncode != 0:
        pytest.skip(f"could not start sshd on {' and '.join(LOOPBACK_HOSTS)}: {started.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["bash", str(script), "stop", str(directory)], timeout=60, check=False)
