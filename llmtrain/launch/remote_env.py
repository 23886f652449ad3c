"""The environment of remote ranks under ``HOSTFILE``: a private env file for DeepSpeed's ssh launch, no credentials.

How DeepSpeed 0.19's runner starts the ranks of two or more hosts (``deepspeed/launcher/runner.py``
and ``multinode_runner.py``): it reads ``KEY=VALUE`` lines from ``$DS_ENV_FILE`` (default
``.deepspeed_env``) in ``~`` and in the current directory, adds every variable of its own
environment with a prefix of ``EXPORT_ENVS`` (``MLFLOW``, ``PYTHON``, ``MV2``, ``UCX``; ``NCCL``
from the CUDA accelerator's ``export_envs()``), and ``PDSHRunner.get_cmd`` writes each as
``export KEY=VALUE;`` (in double quotes when the value holds more than word characters and
``@%+=:,./-``) at the head of the one remote command in pdsh's argv. It logs that argv at info
level (``cmd = pdsh ...``: the console and ``logs/launch-*.log``), ``ps`` shows it on this host,
and each host's sshd runs it as ``bash -c '...'``, which ``ps`` shows there. With one host it
starts the ranks itself, which inherit its environment, and reads no env file.

The launcher writes its own file, ``${XDG_CACHE_HOME:-~/.cache}/llmtrain/deepspeed_env.<launcher pid>``
(mode 0600, directory 0700), and points the runner at it, so a user's own ``.deepspeed_env`` is never
touched; that file's lines (from where the runner would have read them) are copied in after ours, so
they still win. Files of launches that have ended are removed by the next launch. Values never reach
the console or the logs: only the names are printed.

A credential (a name :func:`llmtrain.config.secrets.is_secret_variable` matches: ``HF_TOKEN``,
``SWANLAB_API_KEY``, ``*_PASSWORD``) never goes in that file, from the environment or from a
user's file, since it would be on every command line above; the launcher names those it held back
(:meth:`RemoteEnv.withheld_line`), and the ranks on each host read them from that host's own login
(``hf auth login``, ``swanlab login``) or environment. With two or more hosts, those the runner
would export on its own (``MLFLOW_TRACKING_PASSWORD``) are taken out of its environment too
(:func:`runner_environment`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.config.secrets import is_secret_variable
from llmtrain.supervision import pid_alive

# The job's variables: trackers, the hub, the libraries' knobs, and the launcher's own (LLMTRAIN_*).
REMOTE_ENV_PREFIXES = re.compile(
    r"^(SWANLAB_|WANDB_|HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|NCCL_|GLOO_|TORCH_|PYTORCH_|CUDA_|OMP_|MKL_|LLMTRAIN_)"
)
# What DeepSpeed 0.19's runner exports on its own: runner.py's EXPORT_ENVS, and the CUDA accelerator's export_envs().
RUNNER_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
FILE_PREFIX = "deepspeed_env."


@dataclass
class RemoteEnv:
    """The env file written for one launch: where, and the names it carries (with the file a user's line came from)."""

    path: Path
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # names whose value spans lines
    withheld: list[str] = field(default_factory=list)  # credentials left out (with the file a user's line came from)

    def summary(self) -> str:
        """The line the launcher prints (names only)."""
        return (
            f"launch: remote ranks get {len(self.names)} variable(s) through {self.path}: "
            f"{' '.join(self.names) or 'none'} (and PYTHON* from DeepSpeed's runner itself)"
        )

    def withheld_line(self) -> str | None:
        """The line naming the credentials left out and what to do instead (names only), or None.

        >>> print(RemoteEnv(Path("env"), withheld=["HF_TOKEN", "X_SECRET (from /u/.deepspeed_env)"]).withheld_line())
        launch: credentials not passed to the remote ranks: HF_TOKEN X_SECRET (from /u/.deepspeed_env) \
(DeepSpeed's runner would put them on the pdsh command line, which ps shows and it logs); log in on each host \
instead (`hf auth login` stores the token under HF_HOME, `swanlab login`, `wandb login`) or set them in each \
host's own environment, where its non-interactive ssh shell reads them
        """
        if not self.withheld:
            return None
        return (
            f"launch: credentials not passed to the remote ranks: {' '.join(self.withheld)} (DeepSpeed's runner "
            "would put them on the pdsh command line, which ps shows and it logs); log in on each host instead "
            "(`hf auth login` stores the token under HF_HOME, `swanlab login`, `wandb login`) or set them in each "
            "host's own environment, where its non-interactive ssh shell reads them"
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


def forwarded_by_runner(name: str) -> bool:
    """True for a variable DeepSpeed's runner exports to the remote ranks on its own.

    >>> forwarded_by_runner("MLFLOW_TRACKING_PASSWORD"), forwarded_by_runner("HF_TOKEN")
    (True, False)
    """
    return name.startswith(RUNNER_EXPORT_PREFIXES)


def runner_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less the credentials DeepSpeed's runner would export on its own: what to start it with.

    >>> runner_environment({"MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_URI": "u", "HF_TOKEN": "t"})
    {'MLFLOW_TRACKING_URI': 'u', 'HF_TOKEN': 't'}
    """
    return {name: value for name, value in env.items() if not (forwarded_by_runner(name) and is_secret_variable(name))}


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
        forwarded = bool(REMOTE_ENV_PREFIXES.match(name))
        if (forwarded or forwarded_by_runner(name)) and is_secret_variable(name):
            result.withheld.append(name)
            continue
        if not forwarded:
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
            name = line.split("=", 1)[0].strip()
            if is_secret_variable(name):
                result.withheld.append(f"{name} (from {user_file})")
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
            result.names.append(f"{name} (from {user_file})")
    with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as file:
        file.write("".join(lines))
    return result
