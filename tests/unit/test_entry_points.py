"""How the entry points start: the training stack is imported with the garbage collector off, and ``main``
runs with it on again and the imported objects frozen out of it (:func:`llmtrain.cli.settle_imports`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..conftest import REPO_ROOT

# Imports ENTRY as a module (its top level: gc.disable() and the imports), counting collections, then calls
# the run_cli it imported with a main that records the collector's state.
PROBE = """
import gc, json, sys
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
entry = __import__(sys.argv[1])
after_imports = {"collections": len(collections), "enabled": gc.isenabled()}
in_main = {}
entry.run_cli(lambda argv: in_main.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count()))
print(json.dumps({"after_imports": after_imports, "in_main": in_main}))
"""


@pytest.mark.parametrize("entry", ["pretrain", "finetune"])
def test_the_stack_is_imported_without_collections_and_main_runs_with_the_collector_on(entry: str) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, entry], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    states = json.loads(probe.stdout.splitlines()[-1])
    # A few young-generation ones at most: Python may collect while it compiles the entry file, before its
    # first line runs. With the collector on, the same imports start over a thousand collections.
    assert states["after_imports"]["collections"] <= 5 and states["after_imports"]["enabled"] is False
    assert states["in_main"]["enabled"] is True
    assert states["in_main"]["frozen"] > 100_000  # torch, transformers, DeepSpeed: far more objects than this
