"""What a tool pulls in: a chat answer must not import the training stack (DeepSpeed, the Trainer), and the
launcher's checks before anything starts (its plan: variables, run config, output dir, lock) not even torch or
transformers."""

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


# Runs the launcher's plan and checks as a launch does, and its judgement of an attempt that wrote a complete
# checkpoint (before a restart, and in its last line), then reports the heavy modules they imported.
LAUNCHER_PROBE = """
import json, sys
from pathlib import Path
from llmtrain.launch.supervisor import make_plan, check_output_dir, check_not_held, LOCK_FILE
from llmtrain.launch.progress import Progress
from llmtrain.run.completeness import write_completion_marker
plan = make_plan("pretrain.py", ["--output_dir", {output_dir!r}], {{"NPROC": "2", "PATH": ""}}, Path.cwd())
check_output_dir(plan.output_dir)
check_not_held(plan.output_dir / LOCK_FILE)
progress = Progress.before_attempt(plan.output_dir)
(plan.output_dir / "checkpoint-4").mkdir(parents=True)
write_completion_marker(plan.output_dir / "checkpoint-4", {{}}, checksums=True)
assert progress.after_attempt() == (4, True), progress.after_attempt()
print(plan.output_dir)
print(json.dumps(sorted(name for name in {stack!r} if name in sys.modules)), file=sys.stderr)
"""


def test_the_launcher_checks_and_judges_an_attempt_without_torch_or_transformers(tmp_path: Path) -> None:
    stack = (*TRAINING_STACK, "torch", "transformers")
    probe = LAUNCHER_PROBE.format(output_dir=str(tmp_path / "out"), stack=stack)
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out")  # it ran, and found the output dir
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
