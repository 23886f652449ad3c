"""A secret given on the command line (``--hub_token X``) is never written: not in the launcher's recorded
command or log, not on the console, not in SwanLab's metadata (which records the process's command line).

The launch runs the real value; everything that records the command shows ``***`` instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO_ROOT, free_port, subprocess_env

SEPARATE = "hf-llmtrain-SECRET-VALUE-7c1d"  # given as --hub_token VALUE
JOINED = "hf-llmtrain-SECRET-VALUE-2e9a"  # given as --hub_token=VALUE (the last one wins: the value used)


def test_a_secret_flag_is_in_no_file_the_launch_writes_and_not_on_the_console(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true", "--logging_steps", "1",
        "--eval_strategy", "no", "--save_steps", "2", "--max_steps", "2",
        "--report_to", "swanlab", "--swanlab_mode", "local",
        "--hub_token", SEPARATE, f"--hub_token={JOINED}",
    ]  # fmt: skip
    env = subprocess_env(tmp_path, NPROC="1", MASTER_PORT=str(free_port()), SKIP_DOCTOR="0")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600, check=False)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console.decode(errors="replace")[-4000:]

    for secret in (SEPARATE, JOINED):
        assert secret.encode() not in console
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"secret in {path}"

    # The command was recorded, with the values hidden: by the launcher...
    recorded = next((output_dir / "logs").glob("launch-*.sh")).read_text()
    assert r"--hub_token \*\*\* --hub_token=\*\*\*" in recorded
    assert b"launch: " in console and b"--hub_token *** --hub_token=***" in console
    # ...and by SwanLab, which reads the rank's command line from /proc/self/cmdline
    metadata = json.loads(next((output_dir / "swanlog").rglob("swanlab-metadata.json")).read_text())
    assert metadata["runtime"]["command"].endswith("--hub_token *** --hub_token=***")


# Run as `python -c PROBE ARGS...`: what the process shows of itself once its command line is redacted.
PROBE = """
import json, sys
from llmtrain.config.secrets import redact_command_line
redact_command_line()
with open("/proc/self/cmdline", "rb") as file:
    cmdline = [word.decode() for word in file.read().split(b"\\0") if word]
print(json.dumps({"argv": sys.argv, "cmdline": cmdline}))
"""


def test_the_process_command_line_shows_secret_values_as_stars(tmp_path: Path) -> None:
    args = ["--hub_token", "hf_long_secret_value", "--seed", "3", "--swanlab_api_key=sk-key", "--hub_token", "ab"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["argv"][1:] == ["--hub_token", "***", "--seed", "3", "--swanlab_api_key=***", "--hub_token", "***"]
    # The kernel's copy keeps its length: a value shorter than *** is cut to its own length.
    assert shown["cmdline"][-7:] == ["--hub_token", "***", "--seed", "3", "--swanlab_api_key=***", "--hub_token", "**"]
    assert all(secret not in result.stdout for secret in ("hf_long_secret_value", "sk-key", '"ab"'))
