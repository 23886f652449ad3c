"""The environment of remote ranks under ``HOSTFILE``: a private env file for DeepSpeed's ssh launch.

DeepSpeed's runner starts the remote ranks through pdsh and ssh and passes on only the variables
with its own prefixes (``PYTHON``, ``MLFLOW``, ``UCX``, ``MV2``; ``NCCL`` only from a GPU node). The
rest goes through its env file: it reads ``KEY=VALUE`` lines from ``$DS_ENV_FILE`` (default
``.deepspeed_env``) in ``~`` and in the current directory, and writes ``export KEY=VALUE;`` into each
remote command. The launcher writes its own file,
``${XDG_CACHE_HOME:-~/.cache}/llmtrain/deepspeed_env.<launcher pid>`` (mode 0600, directory 0700),
and points the runner at it, so a user's own ``.deepspeed_env`` is never touched; that file's lines
(from where the runner would have read them) are copied in after ours, so they still win. Files of
launches that have ended are removed by the next launch. Values never reach the console or the
logs: only the names are printed.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.supervision import pid_alive

# The job's variables: trackers, the hub, the libraries' knobs, and the launcher's own (LLMTRAIN_*).
REMOTE_ENV_PREFIXES = re.compile(
    r"^(SWANLAB_|WANDB_|HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|NCCL_|GLOO_|TORCH_|PYTORCH_|CUDA_|OMP_|MKL_|LLMTRAIN_)"
)
FILE_PREFIX = "deepspeed_env."


@dataclass
class RemoteEnv:
    """The env file written for one launch: where, and the names it carries (with the file a user's line came from)."""

    path: Path
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # names whose value spans lines

    def summary(self) -> str:
        """The line the launcher prints (names only)."""
        return (
            f"launch: remote ranks get {len(self.names)} variable(s) through {self.path}: "
            f"{' '.join(self.names) or 'none'} (and PYTHON* from DeepSpeed's runner itself)"
        )


def escape(value: str) -> str:
    """``value`` as the runner's double quotes keep it: ``\\``, ``"``, ``$`` and backticks escaped.

    >>> print(escape('w$and"b`x`\\\\y'))
    w\\$and\\"b\\`x\\`\\\\y
    """
    for char in ("\\", '"', "$", "`"):
        value = value.replace(char, "\\" + char)
    return value


def env_file_dir(env: Mapping[str, str]) -> Path:
    """``${XDG_CACHE_HOME:-$HOME/.cache}/llmtrain``."""
    cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(cache) / "llmtrain"


def remove_ended(directory: Path) -> None:
    """Delete the env files of launches whose launcher pid is no longer running."""
    for path in directory.glob(f"{FILE_PREFIX}*"):
        pid = path.name.removeprefix(FILE_PREFIX)
        if pid.isdigit() and path.is_file() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


def user_env_files(env: Mapping[str, str], cwd: Path, ours: Path) -> list[Path]:
    """The env files DeepSpeed's runner would have read without our ``DS_ENV_FILE``, each once."""
    name = env.get("DS_ENV_FILE") or ".deepspeed_env"
    found: list[Path] = []
    for base in (Path(env.get("HOME") or Path.home()), cwd):
        path = Path(name) if os.path.isabs(name) else base / name
        if not path.is_file() or (ours.exists() and path.samefile(ours)):
            continue
        if any(path.samefile(other) for other in found):
            continue
        found.append(path)
    return found


def write_remote_env(env: Mapping[str, str], cwd: Path, pid: int) -> RemoteEnv:
    """Write this launch's env file (module docstring) and return what it holds."""
    directory = env_file_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    remove_ended(directory)
    result = RemoteEnv(directory / f"{FILE_PREFIX}{pid}")
    lines: list[str] = []
    # PYTHON* is left to the runner, which puts the working directory in front of PYTHONPATH.
    for name in sorted(env):
        if not REMOTE_ENV_PREFIXES.match(name):
            continue
        if "\n" in env[name]:
            result.skipped.append(name)
            continue
        lines.append(f"{name}={escape(env[name])}\n")
        result.names.append(name)
    with contextlib.suppress(FileNotFoundError):
        result.path.unlink()
    descriptor = os.open(result.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.chmod(result.path, 0o600)  # whatever the umask
    for user_file in user_env_files(env, cwd, result.path):
        for line in user_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True):
            if "=" not in line:
                continue  # a blank line would stop the runner's reader
            lines.append(line if line.endswith("\n") else line + "\n")
            result.names.append(f"{line.split('=', 1)[0].strip()} (from {user_file})")
    with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as file:
        file.write("".join(lines))
    return result
