"""A disk that fills up during a checkpoint save: one clear error naming the path and the free space.

The output dir is a 10 MiB tmpfs mounted in a private user and mount namespace (``unshare -rm``,
no root needed where the kernel allows unprivileged namespaces): the tiny model's weights fit, its
optimizer state does not, as on a real disk that fills up mid-save.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import REPO_ROOT, subprocess_env


def namespaces_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not namespaces_available(), reason="unshare -rm (user + mount namespaces) is not permitted here")
def test_a_full_disk_during_a_checkpoint_save_is_one_clear_error(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    train = [
        sys.executable, str(REPO_ROOT / "pretrain.py"), "--output_dir", str(small / "run"), "--report_to", "none",
        "--use_cpu", "true", "--max_steps", "4", "--save_steps", "2", "--dataset_cache_dir", str(tmp_path / "cache"),
        "--disable_tqdm", "true",
    ]  # fmt: skip
    script = f"mount -t tmpfs -o size=10m tmpfs {shlex.quote(str(small))} && exec {shlex.join(train)}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=subprocess_env(tmp_path),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == USER_ERROR_EXIT_CODE, output[-4000:]
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stdout[-4000:]
    assert f"the disk is full: writing {small}/run/checkpoint-2 failed" in errors[0]
    assert "MiB free on the filesystem" in errors[0] and "rerun the same command" in errors[0]
    assert "Traceback" not in output
