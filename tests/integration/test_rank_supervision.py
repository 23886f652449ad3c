"""A rank under its launcher's control, as a real process: a stop request ends a starting rank with exit 75,
a SIGTERM from anyone else still ends it at once; and the recorded command is what bash reads back.

The parts in process: ``tests/unit/test_launcher.py``; whole launches: ``tests/distributed/``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from llmtrain.launch.plan import shell_word, shown
from llmtrain.paths import PROJECT_ROOT
from llmtrain.supervision import CONTROL_DIR_VARIABLE, RUN, STOP, ControlWriter, new_record

RANK_UNDER_A_LAUNCHER = """
import os, signal, sys, time
from llmtrain import supervision
from llmtrain.errors import TrainingPreempted
try:
    supervision.attach_rank()
    print("attached", flush=True)
    time.sleep(60)
except TrainingPreempted as stopped:
    print("preempted:", stopped, flush=True)
    sys.exit(75)
"""


def test_a_stop_request_reaches_a_starting_rank_as_exit_75(tmp_path: Path) -> None:
    writer = ControlWriter(tmp_path, new_record(0, 30, 600, state=RUN)).open()
    env = {**os.environ, CONTROL_DIR_VARIABLE: str(tmp_path), "RANK": "0", "PYTHONPATH": str(PROJECT_ROOT)}
    rank = subprocess.Popen([sys.executable, "-c", RANK_UNDER_A_LAUNCHER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout is not None and rank.stdout.readline() == "attached\n"
        writer.update(state=STOP, signal="SIGTERM")
        assert rank.wait(timeout=10) == 75
        assert "stopped before training started (the launcher asks every rank to stop" in rank.stdout.read()
    finally:
        rank.kill()
        writer.close(75)


def test_a_foreign_sigterm_outside_training_still_ends_a_rank_at_once(tmp_path: Path) -> None:
    writer = ControlWriter(tmp_path, new_record(0, 30, 600, state=RUN)).open()
    env = {**os.environ, CONTROL_DIR_VARIABLE: str(tmp_path), "RANK": "0", "PYTHONPATH": str(PROJECT_ROOT)}
    rank = subprocess.Popen([sys.executable, "-c", RANK_UNDER_A_LAUNCHER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout is not None and rank.stdout.readline() == "attached\n"
        rank.send_signal(signal.SIGTERM)
        assert rank.wait(timeout=10) == -signal.SIGTERM
    finally:
        rank.kill()
        writer.close(0)


def test_recorded_commands_hide_secrets_and_quote_as_bash_does() -> None:
    command = shown(["python", "x.py", "--hub_token", "hf_1", "--run_name", "a b$c"])
    assert "hf_1" not in command
    words = [shell_word(word) for word in command]
    assert words[3] == "\\*\\*\\*"
    bash = subprocess.run(
        ["bash", "-c", 'printf "%s\\n" ' + " ".join(words)], capture_output=True, text=True, check=True
    )
    assert bash.stdout.splitlines() == command
