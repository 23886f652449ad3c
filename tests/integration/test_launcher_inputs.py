"""Bad run configs and output dirs through ``bash pretrain.sh``: one ``launch:`` line, exit 2, nothing written.

The launcher checks the run config (:mod:`llmtrain.launch.plan`, through the entry points' own YAML
reader) before it writes its logs or starts anything, so each case ends in well under a second of
Python: no traceback, no output dir, no logs, no DeepSpeed env file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import REPO_ROOT, free_port, subprocess_env


def launch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = subprocess_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    for name in ("NPROC", "NUM_GPUS", "HOSTFILE", "NNODES", "DRY_RUN", "DS_ENV_FILE"):
        full_env.pop(name, None)
    full_env.update(env)
    return subprocess.run(
        ["bash", str(REPO_ROOT / "pretrain.sh"), *args],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def every_path(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


def assert_one_launch_error(result: subprocess.CompletedProcess[str], pattern: str) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("launch: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


def yaml_case(content: str | bytes, pattern: str) -> Callable[[Path], tuple[list[str], str]]:
    def make(tmp_path: Path) -> tuple[list[str], str]:
        config = tmp_path / "run.yaml"
        if isinstance(content, bytes):
            config.write_bytes(content)
        else:
            config.write_text(content)
        return [str(config), "--output_dir", str(tmp_path / "out")], pattern

    return make


def output_dir_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "out").write_text("a file, not a directory")
    return ["--output_dir", str(tmp_path / "out")], rf"^launch: output_dir: {re.escape(str(tmp_path))}/out is a file$"


def output_dir_under_a_file(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "a-file").write_text("a file, not a directory")
    return [
        "--output_dir",
        str(tmp_path / "a-file" / "out"),
    ], r"output_dir: .*a-file is not a directory, so .*a-file/out cannot be created there"


def output_dir_in_yaml_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "out").write_text("a file, not a directory")
    (tmp_path / "run.yaml").write_text(f"output_dir: {tmp_path / 'out'}  # a file\n")
    return [str(tmp_path / "run.yaml")], rf"output_dir: {re.escape(str(tmp_path))}/out is a file"


CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "tab-indent": yaml_case(
        "learning_rate: 1.0e-4\n\tblock_size: 64\n",
        r"run\.yaml:2:1: invalid YAML: .*'\\t'.*indents with spaces, not tabs",
    ),
    "top-level-list": yaml_case(
        "- learning_rate: 1.0e-4\n- block_size: 64\n",
        r"run\.yaml:1: a run config must be a mapping of field: value, not a list",
    ),
    "non-utf8-byte": yaml_case(
        b"learning_rate: 1.0e-4\nrun_name: caf\xe9\n", r"run\.yaml:2:14: not UTF-8 text \(byte 0xe9\)"
    ),
    "duplicate-key": yaml_case(
        "learning_rate: 1.0e-4\nblock_size: 64\nlearning_rate: 2.0e-4\n",
        r"run\.yaml:3: 'learning_rate' is set twice \(first on line 1\)",
    ),
    "missing-config": lambda tmp_path: ([str(tmp_path / "nope.yaml")], r"config file .*nope\.yaml does not exist"),
    "output-dir-is-a-file": output_dir_is_a_file,
    "output-dir-under-a-file": output_dir_under_a_file,
    "output-dir-in-yaml-is-a-file": output_dir_in_yaml_is_a_file,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_launcher_input_is_one_line_exit_2_and_writes_nothing(name: str, tmp_path: Path) -> None:
    args, pattern = CASES[name](tmp_path)
    before = every_path(tmp_path)
    result = launch(tmp_path, *args, SKIP_DOCTOR="0")
    assert_one_launch_error(result, pattern)
    assert "Traceback" not in result.stdout + result.stderr
    assert every_path(tmp_path) == before  # no output dir, no logs, no default outputs/ dir


def test_nothing_is_written_under_hostfile_either(tmp_path: Path) -> None:
    # Under HOSTFILE the launcher also writes DeepSpeed's env file for the remote ranks: not before the check.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args, pattern = CASES["tab-indent"](tmp_path)
    before = every_path(tmp_path)
    result = launch(tmp_path, *args, HOSTFILE=str(hostfile), NPROC="1", HOME=str(tmp_path))
    assert_one_launch_error(result, pattern)
    assert every_path(tmp_path) == before


def read_only_mount_available() -> bool:
    """An unprivileged user+mount namespace (``unshare -rm``) where a bind mount can be made read-only."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not read_only_mount_available(), reason="no unprivileged mount namespace (unshare -rm) here")
def test_an_output_dir_on_a_read_only_mount_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # chmod does not stop root; a read-only bind mount stops everyone, root included.
    mount = tmp_path / "read-only"
    mount.mkdir()
    (mount / "existing-run").mkdir()
    for output_dir in (mount / "new-run", mount / "existing-run"):
        script = (
            f'mount --bind "{mount}" "{mount}" && mount -o remount,bind,ro "{mount}" && '
            f'exec bash "{REPO_ROOT / "pretrain.sh"}" --output_dir "{output_dir}"'
        )
        result = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script],
            cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        # The folder named is where writing failed: the new run's nearest existing parent, or the existing run.
        where = mount if output_dir.name == "new-run" else output_dir
        assert_one_launch_error(
            result, rf"^launch: output_dir: cannot write in {re.escape(str(where))} \(Read-only file system\)$"
        )
    assert every_path(mount) == {"existing-run"}


def test_a_failed_preflight_ends_the_launch_before_any_rank_runs_main(tmp_path: Path) -> None:
    # The job starts while the preflight runs; the ranks wait for its verdict, which here is no.
    missing = tmp_path / "missing.jsonl"
    output_dir = tmp_path / "out"
    result = launch(
        tmp_path, "--output_dir", str(output_dir), "--train_files", str(missing), "--dataset_cache_dir",
        str(tmp_path / "cache"), SKIP_DOCTOR="0", NPROC="1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert f"doctor: ERROR   data: train_files: data file {missing} does not exist\n" in result.stdout
    last_line = result.stdout.rstrip().splitlines()[-1]
    assert last_line == "launch: preflight failed (exit 2); fix the ERROR lines above (SKIP_DOCTOR=1 skips the check)"
    assert "WORLD INFO DICT" not in result.stdout  # the job's own output (here launch.py's) went to the log only
    assert sorted(path.name for path in output_dir.iterdir()) == ["logs"]  # no rank reached the output dir
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(output_dir) in " ".join(p.info["cmdline"] or [])]
    assert left == []
