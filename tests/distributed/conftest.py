"""Fixtures of the multi-process tests: two ssh hosts on loopback for the HOSTFILE launches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT

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
