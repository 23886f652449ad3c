"""What a tool pulls in: a chat answer must not import the training stack (DeepSpeed, the Trainer), and the
launchers' output-dir check (scripts/output_dir.py, run before every launch) not even torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT, subprocess_env

TRAINING_STACK = ("deepspeed", "transformers.trainer", "llmtrain.run.trainer", "llmtrain.config.arguments")
# Runs the tool's `--help` in a fresh interpreter and reports which training modules were imported.
PROBE = """
import json, runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(name for name in {stack!r} if name in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "module", ["llmtrain.tools.chat", "llmtrain.tools.compare", "llmtrain.tools.merge", "llmtrain.tools.inspect_data"]
)
def test_inference_tools_do_not_import_the_training_stack(module: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, stack=TRAINING_STACK)],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout  # --help really ran
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


# Runs scripts/output_dir.py as the launcher does and reports the heavy modules it imported.
OUTPUT_DIR_PROBE = """
import json, runpy, sys
sys.argv = [{script!r}, "pretrain.py", "--output_dir", {output_dir!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print(json.dumps(sorted(name for name in {stack!r} if name in sys.modules)), file=sys.stderr)
"""


def test_the_launchers_output_dir_check_does_not_import_torch_or_transformers(tmp_path: Path) -> None:
    script = str(REPO_ROOT / "scripts" / "output_dir.py")
    stack = (*TRAINING_STACK, "torch", "transformers")
    probe = OUTPUT_DIR_PROBE.format(script=script, output_dir=str(tmp_path / "out"), stack=stack)
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out")  # it ran, and found the output dir
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
