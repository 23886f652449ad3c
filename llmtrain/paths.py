"""Where the project's own files live (the checkout, the shipped configs, the embedded tiny default),
and whether files can be written at a path.

A leaf module (standard library only), so the launcher, the argument dataclasses and the
tools can name these paths without importing what builds them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # a checkout: configs/, scripts/ and requirements.txt
CONFIGS_DIR = PROJECT_ROOT / "configs"
REQUIREMENTS_FILE = PROJECT_ROOT / "requirements.txt"
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


def process_umask() -> int:
    """The process umask, read without changing it (``/proc``), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would have given.

    Some writers create private files: safetensors writes 0600, ``tempfile.mkdtemp`` makes 0700
    dirs. An output another user or a serving container must read gets 0666/0777 (0777 for files
    executable by their owner) minus the umask, as ``save_pretrained``'s JSON files already have.

    >>> import stat; d = Path(tempfile.mkdtemp()); f = d / "model.safetensors"; _ = f.write_bytes(b"x")
    >>> f.chmod(0o600); old = os.umask(0o022); apply_umask(d); _ = os.umask(old)
    >>> oct(stat.S_IMODE(f.stat().st_mode)), oct(stat.S_IMODE(d.stat().st_mode))
    ('0o644', '0o755')
    """
    mask = process_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        full = 0o777 if path.is_dir() or mode & 0o100 else 0o666
        path.chmod(full & ~mask)


def portable_model_reference(name_or_path: str) -> str:
    """How an adapter should name its base model: the hub id for a hub-cache snapshot, else ``name_or_path`` as given.

    A hub download lives in ``…/models--ORG--NAME/snapshots/REVISION``; the id loads on any machine
    with the hub (or its own cache), while the local path exists only here.

    >>> portable_model_reference("/home/me/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/ab12")
    'Qwen/Qwen2.5-0.5B'
    >>> portable_model_reference("outputs/pretrain-tiny"), portable_model_reference("Qwen/Qwen3-0.6B")
    ('outputs/pretrain-tiny', 'Qwen/Qwen3-0.6B')
    """
    parts = Path(name_or_path).parts
    for index, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[index + 1] == "snapshots" and index + 3 == len(parts):
            return part.removeprefix("models--").replace("--", "/")
    return name_or_path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints), read in bounded chunks.

    >>> p = Path(tempfile.mkdtemp()) / "f"; _ = p.write_bytes(b"abc"); file_sha256(p)[:16]
    'ba7816bf8f01cfea'
    """
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
