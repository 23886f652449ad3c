"""Where the project's own files live (the checkout, the shipped configs, the embedded tiny default),
and whether files can be written at a path.

A leaf module (standard library only), so the launcher's helpers, the argument dataclasses and the
tools can name these paths without importing what builds them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # a checkout: configs/, scripts/ and requirements.txt
CONFIGS_DIR = PROJECT_ROOT / "configs"
REQUIREMENTS_FILE = PROJECT_ROOT / "requirements.txt"
TOPOLOGY_SCRIPT = PROJECT_ROOT / "scripts" / "topology.sh"  # the launcher's GPU / rank rule, run by the doctor
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny"  # the tiny tokenizer and Qwen2 config (python -m llmtrain.tiny_default)
# A Qwen3-style chat template for the tiny tokenizer: history renders without think blocks (not prefix-stable).
TINY_THINK_TEMPLATE = ASSETS_DIR / "templates" / "tiny_think.jinja"
DEMO_CORPUS_PATH = ASSETS_DIR / "demo" / "pretrain_corpus.jsonl"
DEMO_CONVERSATIONS_PATH = ASSETS_DIR / "demo" / "sft_conversations.jsonl"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: Path) -> str | None:
    """Why files cannot be written at ``path`` (a directory, created if missing), or None when they can.

    A probe file is created and deleted in ``path``, or in its nearest existing parent when ``path``
    does not exist yet; nothing is created or left behind. Shared by the run and the preflight.
    """
    target = nearest_existing(path)
    if not target.is_dir():
        return f"{target} is not a directory, so {path} cannot be created there"
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".llmtrain-probe-", dir=target)
    except OSError as error:
        return f"cannot write in {target} ({error.strerror or error})"
    os.close(descriptor)
    os.unlink(probe)
    return None
