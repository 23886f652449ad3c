"""What a tool pulls in: a chat answer must not import the training stack (DeepSpeed, the Trainer)."""

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


@pytest.mark.parametrize("module", ["llmtrain.tools.chat", "llmtrain.tools.compare", "llmtrain.tools.merge"])
def test_inference_tools_do_not_import_the_training_stack(module: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, stack=TRAINING_STACK)],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout  # --help really ran
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
