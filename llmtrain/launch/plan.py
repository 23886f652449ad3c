"""What a launch will do, decided before anything starts: settings, run config, topology and the job's command.

Light (no torch, no transformers): a bad variable, run config or output dir, or a credential given
as a flag or run-config key (:func:`llmtrain.config.secrets.refuse_secret_settings`, as the entry
points refuse it), ends the launch in well under a second with one ``launch: ...`` line and exit 2,
having written nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmtrain.config.secrets import redact_secrets, refuse_secret_settings
from llmtrain.config.yaml_file import read_run_config, split_config_path
from llmtrain.errors import ConfigError
from llmtrain.paths import PROJECT_ROOT, writable_problem
from llmtrain.stages import Stage, find_stage
from llmtrain.topology import Topology, launch_topology, whole_number

DEFAULT_OUTPUT_DIR = "trainer_output"  # TrainingArguments' own default
LOG_DIR = "logs"  # where the launcher writes its command, its console log and its control files
DEFAULT_DS_CONFIG = "ds_config_zero2.json"
DEFAULT_MASTER_PORT = "29500"
DEFAULT_MAX_RESTARTS = "2"
DEFAULT_PREEMPT_GRACE_S = "600"
# Seconds without a heartbeat after which a node's launcher counts as lost (by its peers under NNODES,
# by its remote ranks): well above a filesystem hiccup, and the reason a lost node is reported within a minute.
DEFAULT_NODE_TIMEOUT_S = "30"
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "on"})  # what HfArgumentParser reads as True
SIMPLE_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


@dataclass(frozen=True)
class Settings:
    """The launcher's variables, read and checked once."""

    root: Path
    stage: Stage
    python: str
    ds_config: str
    hostfile: str
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    max_restarts: int
    skip_doctor: bool
    preempt_grace_s: int
    node_timeout_s: int
    dry_run: bool

    @classmethod
    def from_environ(cls, entry_file: str, env: Mapping[str, str], cwd: Path, root: Path = PROJECT_ROOT) -> Settings:
        """Read the variables (``docs/launching.md``); raises :class:`ConfigError` naming a bad one."""
        python = env.get("PYTHON") or (str(root / ".venv/bin/python") if (root / ".venv/bin/python").is_file() else "")
        settings = cls(
            root=root,
            stage=find_stage(entry_file),
            python=python or "python3",
            ds_config=resolve_ds_config(env.get("DS_CONFIG") or str(root / DEFAULT_DS_CONFIG), cwd, root),
            hostfile=env.get("HOSTFILE", ""),
            nnodes=whole_number("NNODES", env.get("NNODES") or "1"),
            node_rank=whole_number("NODE_RANK", env.get("NODE_RANK") or "0"),
            master_addr=env.get("MASTER_ADDR", ""),
            master_port=whole_number("MASTER_PORT", env.get("MASTER_PORT") or DEFAULT_MASTER_PORT),
            max_restarts=whole_number("MAX_RESTARTS", env.get("MAX_RESTARTS") or DEFAULT_MAX_RESTARTS),
            skip_doctor=env.get("SKIP_DOCTOR", "0") == "1",
            preempt_grace_s=seconds("PREEMPT_GRACE_S", env.get("PREEMPT_GRACE_S") or DEFAULT_PREEMPT_GRACE_S),
            node_timeout_s=seconds("NODE_TIMEOUT_S", env.get("NODE_TIMEOUT_S") or DEFAULT_NODE_TIMEOUT_S),
            dry_run=env.get("DRY_RUN", "0") == "1",
        )
        if settings.nnodes > 1 and not settings.hostfile:
            if not settings.master_addr:
                raise ConfigError(f"NNODES={settings.nnodes} needs MASTER_ADDR (the address of node 0)")
            if settings.node_rank >= settings.nnodes:
                raise ConfigError(f"NODE_RANK={settings.node_rank} must be below NNODES={settings.nnodes}")
        if settings.node_timeout_s < 1:
            raise ConfigError("NODE_TIMEOUT_S must be at least 1 second")
        return settings

    @property
    def entry(self) -> Path:
        return self.root / self.stage.entry_file

    @property
    def multi_node(self) -> str:
        """``hostfile``, ``nnodes`` or "" (one node)."""
        return "hostfile" if self.hostfile else "nnodes" if self.nnodes > 1 else ""


def seconds(name: str, value: str) -> int:
    """A whole number of seconds, or a one-line error naming ``name``.

    >>> seconds("PREEMPT_GRACE_S", "x")
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: PREEMPT_GRACE_S='x' must be a whole number of seconds
    """
    try:
        return whole_number(name, value)
    except ConfigError as error:
        raise ConfigError(f"{error} of seconds") from None


def resolve_ds_config(value: str, cwd: Path, root: Path) -> str:
    """``DS_CONFIG`` as an absolute path: a relative one is looked up in ``cwd``, then in the checkout.

    The ranks and the preflight then find it whatever their working directory.
    """
    if os.path.isabs(value):
        return value
    for base in (cwd, root):
        if (base / value).is_file():
            return str((base / value).resolve())
    raise ConfigError(f"DS_CONFIG={value}: no such file in {cwd} or {root}")


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The last value given to ``--name`` (or ``--na-me``) in ``args``; "true" for a bare flag.

    >>> flag_value(["--use_cpu", "--seed", "1"], "use_cpu"), flag_value(["--output-dir=b"], "output_dir")
    ('true', 'b')
    """
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}  # the parser takes both
    value = None
    for index, arg in enumerate(args):
        flag, has_value, text = arg.partition("=")
        if flag not in spellings:
            continue
        if has_value:
            value = text
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
        else:
            value = "true"
    return value


@dataclass(frozen=True)
class RunInputs:
    """What the launcher needs from the run config and the CLI overrides, read once."""

    config_path: Path | None
    values: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, stage: Stage, user_args: Sequence[str]) -> RunInputs:
        """Read the run config (the entry points' own reader: :mod:`llmtrain.config.yaml_file`).

        Raises :class:`ConfigError` for a credential among the flags or the run config's keys, as
        :func:`llmtrain.config.parser.parse_args` does.
        """
        config_path, overrides = split_config_path(user_args, stage.default_config)
        config = read_run_config(config_path) if config_path is not None else None
        refuse_secret_settings(overrides, config)
        inputs = cls(config_path, dict(config.values) if config else {}, overrides)
        output_dir = inputs.values.get("output_dir")
        if config is not None and isinstance(output_dir, list | dict):
            raise ConfigError(f"{config.where('output_dir')}: 'output_dir' takes a single path")
        return inputs

    @property
    def output_dir(self) -> Path:
        """The last ``--output_dir``, else the run config's, else the Trainer's default."""
        value = flag_value(self.overrides, "output_dir") or self.values.get("output_dir")
        return Path(str(value) if value not in (None, "") else DEFAULT_OUTPUT_DIR)

    @property
    def use_cpu(self) -> bool:
        """Whether the arguments themselves ask for CPU ranks (``use_cpu: true`` or ``--use_cpu true``)."""
        value = flag_value(self.overrides, "use_cpu")
        if value is None:
            return self.values.get("use_cpu") is True or str(self.values.get("use_cpu", "")).lower() in TRUE_WORDS
        return value.lower() in TRUE_WORDS


def directory_problem(path: Path) -> str | None:
    """Why the directory ``path`` cannot be made and written in, or None.

    Beyond the run's own probe (:func:`llmtrain.paths.writable_problem`, which creates and deletes a
    file in ``path`` or its nearest existing parent), a file or a broken link at ``path`` is named as such.
    """
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link"
    if path.exists() and not path.is_dir():
        return f"{path} is a file" if path.is_file() else f"{path} is not a directory"
    return writable_problem(path)


def check_output_dir(output_dir: Path) -> None:
    """Raise :class:`ConfigError` when ``output_dir`` (or its ``logs/``) cannot be made and written in."""
    problem = directory_problem(output_dir) or directory_problem(output_dir / LOG_DIR)
    if problem is not None:
        raise ConfigError(f"output_dir: {problem}")


@dataclass(frozen=True)
class Plan:
    """The job a launch starts: its command, the arguments the ranks get and what the launcher exports."""

    settings: Settings
    topology: Topology  # gpus=0 whenever the ranks are CPU ranks (NPROC, or --use_cpu true)
    inputs: RunInputs
    args: list[str]  # the entry file's arguments, the launcher's own added
    exports: dict[str, str]  # what the launcher sets in the job's environment for the user's sake

    @property
    def output_dir(self) -> Path:
        return self.inputs.output_dir

    def command(self, env_file: Path | None = None) -> list[str]:
        """The job's argv: DeepSpeed's runner with pdsh under HOSTFILE, torchrun under NNODES, and on one
        node DeepSpeed's per-node launcher (:func:`local_deepspeed_launch`)."""
        s, python = self.settings, self.settings.python
        if s.hostfile:
            launcher = ["env", f"DS_ENV_FILE={env_file}"] if env_file is not None else []
            launcher += [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", s.hostfile]
            launcher += ["--master_port", str(s.master_port)]
            if s.master_addr:
                launcher += ["--master_addr", s.master_addr]
        elif s.nnodes > 1:
            launcher = [
                python, "-u", "-m", "torch.distributed.run", "--nnodes", str(s.nnodes), "--node_rank", str(s.node_rank),
                "--master_addr", s.master_addr, "--master_port", str(s.master_port),
                "--nproc_per_node", str(self.topology.ranks),
            ]  # fmt: skip
        else:
            launcher = local_deepspeed_launch(python, self.topology, s.master_port)
        return [*launcher, str(s.entry), *self.args]

    @property
    def job_dies_with_launcher(self) -> bool:
        """Whether the job's top process gets SIGTERM when the launcher dies (:mod:`llmtrain.launch.job`).

        DeepSpeed's runner and torchrun do. DeepSpeed's per-node launcher does not: on SIGTERM it would
        give its ranks 30 s to end before it SIGKILLs them, where the ranks, seeing their launcher gone,
        stop by themselves and have the whole grace period to save (:mod:`llmtrain.supervision`).
        """
        return bool(self.settings.hostfile) or self.settings.nnodes > 1


def local_deepspeed_launch(python: str, topology: Topology, master_port: int | str) -> list[str]:
    """DeepSpeed's per-node launcher for the ranks of this node, as DeepSpeed's runner would start it.

    For local resources the runner (``deepspeed.launcher.runner.main``, DeepSpeed 0.19) only encodes the
    ranks' devices as ``--world_info`` (``{"localhost": [ids]}``: the ``--include`` devices, or the first
    ``--num_gpus`` ids), starts ``deepspeed.launcher.launch`` with them and waits; started directly, the
    launch saves one process that imports DeepSpeed and torch (~1.5 s). The per-node launcher sets each
    rank's ``CUDA_VISIBLE_DEVICES``, ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.

    >>> command = local_deepspeed_launch("py", Topology(gpus=2, ranks=2, gpus_from="", hosts=1, devices="4,5"), 29500)
    >>> command[3], command[5:]
    ('deepspeed.launcher.launch', ['--master_addr=127.0.0.1', '--master_port=29500', '--log_level=info'])
    >>> json.loads(base64.urlsafe_b64decode(command[4].removeprefix("--world_info=")))
    {'localhost': [4, 5]}
    >>> cpu = local_deepspeed_launch("py", Topology(gpus=0, ranks=3, gpus_from="", hosts=1), 29500)
    >>> json.loads(base64.urlsafe_b64decode(cpu[4].removeprefix("--world_info=")))
    {'localhost': [0, 1, 2]}
    """
    if topology.devices:
        devices: list[int | str] = [int(d) if d.isdigit() else d for d in topology.devices.split(",")]
    else:
        devices = list(range(topology.ranks))
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": devices}).encode()).decode()
    return [
        python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
        "--master_addr=127.0.0.1", f"--master_port={master_port}", "--log_level=info",
    ]  # fmt: skip


def make_plan(entry_file: str, user_args: Sequence[str], env: Mapping[str, str], cwd: Path) -> Plan:
    """Everything decided before anything is written (module docstring); raises :class:`ConfigError`."""
    settings = Settings.from_environ(entry_file, env, cwd)
    topology = launch_topology(env)
    inputs = RunInputs.read(settings.stage, user_args)
    overrides = ["--deepspeed", settings.ds_config]
    if topology.gpus == 0 and not inputs.use_cpu:
        overrides += ["--use_cpu", "true"]
    if inputs.use_cpu:
        topology = replace(topology, gpus=0, devices="")
    exports: dict[str, str] = {}
    if topology.gpus == 0 and not settings.hostfile:
        # Share the cores between the CPU ranks instead of letting each oversubscribe them. Not under
        # HOSTFILE: the ranks run on the hostfile's hosts, whose cores this node does not know.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        exports["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(max(1, cores // topology.ranks))
    # A run config given as the first argument stays first; the user's overrides come after ours and win.
    args = list(user_args)
    first = [args.pop(0)] if args and not args[0].startswith("-") else []
    return Plan(settings, topology, inputs, [*first, *overrides, *args], exports)


def shell_word(word: str) -> str:
    """``word`` as bash's ``printf %q`` writes it: as is when plain, else each special character escaped.

    >>> shell_word("--hub_token=***"), shell_word("a b"), shell_word("plain/path.yaml"), shell_word("")
    ('--hub_token=\\\\*\\\\*\\\\*', 'a\\\\ b', 'plain/path.yaml', "''")
    """
    if SIMPLE_WORD.match(word):
        return word
    if not word:
        return "''"
    if not word.isprintable():
        escaped = word.encode("unicode_escape").decode("ascii").replace("'", "\\'")
        return f"$'{escaped}'"
    return "".join(char if SIMPLE_WORD.match(char) else "\\" + char for char in word)


def shown(command: Sequence[str]) -> list[str]:
    """``command`` as the launcher prints and records it: secret flag values as ``***``.

    The plan refuses such flags (:meth:`RunInputs.read`), so this is a second line only.

    >>> shown(["x", "--hub_token", "hf_a", "--hub_token=hf_b", "--seed", "1"])
    ['x', '--hub_token', '***', '--hub_token=***', '--seed', '1']
    """
    return redact_secrets(command)
