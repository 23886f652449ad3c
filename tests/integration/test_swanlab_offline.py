"""Cloud tracking chosen on a node that cannot reach the SwanLab server: one clear error, not a traceback.

An API key in the environment selects cloud mode (as it does for a user who exported it in their
shell profile); the server is an address where nothing listens, as on an offline GPU node.
"""

from __future__ import annotations

from pathlib import Path

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import free_port, served_entry


def test_cloud_mode_without_a_reachable_server_says_so_and_suggests_local_mode(tmp_path: Path) -> None:
    secret = "sk-offline-node-0123456789"
    args = [
        "--output_dir", str(tmp_path / "out"), "--report_to", "swanlab", "--use_cpu", "true", "--max_steps", "2",
        "--dataset_cache_dir", str(tmp_path / "cache"), "--swanlab_log_dir", str(tmp_path / "swanlog"),
    ]  # fmt: skip
    result = served_entry(args, tmp_path, SWANLAB_MODE=None, SWANLAB_API_KEY=secret,
                       SWANLAB_API_HOST=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == USER_ERROR_EXIT_CODE, output[-4000:]
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stdout[-4000:]
    assert "swanlab_mode: cloud mode could not log in to http://127.0.0.1:" in errors[0]
    assert "set swanlab_mode: local" in errors[0]
    assert "Traceback" not in output and secret not in output
