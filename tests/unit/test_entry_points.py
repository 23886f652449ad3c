"""How the entry points start: run as scripts, they import the training stack with the garbage collector off,
and ``main`` runs with it on again and the imported objects frozen out of it (:func:`llmtrain.cli.settle_imports`);
imported as modules, they leave the collector alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..conftest import REPO_ROOT

# Runs ENTRY as `python ENTRY --help` would (its parser prints the help, then it exits 0), counting the
# collections until run_cli settles the imports, then reading the collector's state after main.
AS_SCRIPT = """
import gc, json, runpy, sys
import llmtrain.cli as cli
collections, states = [], {}
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
settle = cli.settle_imports
def recording_settle():
    states["before_main"] = {"collections": len(collections), "enabled": gc.isenabled()}
    settle()
cli.settle_imports = recording_settle
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as ended:
    states["exit_code"] = ended.code
states["after_main"] = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
print(json.dumps(states))
"""
AS_MODULE = "import gc, sys; __import__(sys.argv[1]); print(gc.isenabled())"


def probe(script: str, entry: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script, entry], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.splitlines()[-1]


@pytest.mark.parametrize("entry", ["pretrain.py", "finetune.py"])
def test_the_stack_is_imported_without_collections_and_main_runs_with_the_collector_on(entry: str) -> None:
    states = json.loads(probe(AS_SCRIPT, entry))
    # A few young-generation ones at most: Python may collect while it compiles the entry file, before its
    # first line runs. With the collector on, the same imports start over a thousand collections.
    assert states["before_main"]["collections"] <= 5 and states["before_main"]["enabled"] is False
    assert states["exit_code"] == 0
    assert states["after_main"]["enabled"] is True
    assert states["after_main"]["frozen"] > 100_000  # torch, transformers, DeepSpeed: far more objects than this


def test_an_entry_imported_as_a_module_leaves_the_collector_on() -> None:
    assert probe(AS_MODULE, "pretrain") == "True"
