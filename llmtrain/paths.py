"""Where the project's own files live: the checkout, the shipped configs and the embedded tiny default.

A leaf module (pathlib only), so the launcher's helpers, the argument dataclasses and the tools can
name these paths without importing what builds them.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # a checkout: configs/, scripts/ and requirements.txt
CONFIGS_DIR = PROJECT_ROOT / "configs"
REQUIREMENTS_FILE = PROJECT_ROOT / "requirements.txt"
TOPOLOGY_SCRIPT = PROJECT_ROOT / "scripts" / "topology.sh"  # the launcher's GPU / rank rule, run by the doctor
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny"  # the tiny tokenizer and Qwen2 config (python -m llmtrain.tiny_default)
DEMO_CORPUS_PATH = ASSETS_DIR / "demo" / "pretrain_corpus.jsonl"
DEMO_CONVERSATIONS_PATH = ASSETS_DIR / "demo" / "sft_conversations.jsonl"
