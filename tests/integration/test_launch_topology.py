"""The launchers' topology rules through ``DRY_RUN=1 bash pretrain.sh``: the exact command, nothing started.

A fake ``nvidia-smi`` on PATH stands in for an 8-GPU node (or a node whose driver is missing), and a
fake ``PYTHON`` records any call, so each test proves that a dry run starts nothing: no preflight,
no output dir, no DeepSpeed. Each launch is a few milliseconds of bash.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

from ..conftest import REPO_ROOT, subprocess_env

# Variables of the developer's shell that would change the topology under test.
LAUNCH_VARIABLES = (
    "NUM_GPUS", "NPROC", "CUDA_VISIBLE_DEVICES", "HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "DS_ENV_FILE", "OMP_NUM_THREADS", "XDG_CACHE_HOME",
)  # fmt: skip
SMI_8_GPUS = "".join(
    f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-0000-0000-0000-000000000000)"\n' for i in range(8)
)
SMI_NO_DRIVER = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2\nexit 9\n'


def executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def dry_run(
    tmp_path: Path, *args: str, script: str = "pretrain.sh", smi: str = SMI_8_GPUS, **env: str
) -> subprocess.CompletedProcess[str]:
    """``DRY_RUN=1 bash SCRIPT ARGS`` in tmp_path, with the preflight on and a Python that must not run."""
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "nvidia-smi", smi)
    python = executable(bin_dir / "python", f'touch "{tmp_path / "python-ran"}"\nexit 1\n')
    full_env = subprocess_env(tmp_path)
    for name in LAUNCH_VARIABLES:
        full_env.pop(name, None)
    full_env.update(
        DRY_RUN="1",
        SKIP_DOCTOR="0",
        PYTHON=str(python),
        HOME=str(tmp_path / "home"),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    full_env.update(env)
    (tmp_path / "home").mkdir(exist_ok=True)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / script), *args],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert not (tmp_path / "python-ran").exists(), "a dry run ran Python (preflight, output dir or launch)"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "out").exists(), "a dry run made an output dir"
    return result


def command(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The argv the launcher printed for ``dry run: command:``."""
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("dry run: command: ")]
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0].removeprefix("dry run: command: "))


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def local_devices(argv: list[str]) -> list[int]:
    """The devices of a one-node launch: DeepSpeed's per-node launcher's ``--world_info`` (base64 JSON)."""
    assert argv[1:4] == ["-u", "-m", "deepspeed.launcher.launch"], argv[:6]
    world_info = next(arg for arg in argv if arg.startswith("--world_info=")).removeprefix("--world_info=")
    world = json.loads(base64.urlsafe_b64decode(world_info))
    assert list(world) == ["localhost"]
    return world["localhost"]


def test_plain_gpu_node_uses_every_gpu(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "--output_dir", str(tmp_path / "out"), "--learning_rate", "1.0e-3")
    argv = command(result)
    assert local_devices(argv) == list(range(8))
    assert "--use_cpu" not in argv
    entry = argv.index(str(REPO_ROOT / "pretrain.py"))
    assert argv[entry + 1 :] == [
        "--deepspeed", str(REPO_ROOT / "ds_config_zero2.json"), "--output_dir", str(tmp_path / "out"),
        "--learning_rate", "1.0e-3",
    ]  # fmt: skip
    assert "dry run: gpus=8 ranks=8 gpus_from=nvidia-smi hosts=1" in result.stdout


def test_cuda_visible_devices_becomes_include(tmp_path: Path) -> None:
    argv = command(dry_run(tmp_path, CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert local_devices(argv) == [4, 5, 6, 7]  # the per-node launcher sets each rank's CUDA_VISIBLE_DEVICES
    assert "--use_cpu" not in argv


def test_num_gpus_takes_the_first_visible_devices(tmp_path: Path) -> None:
    argv = command(dry_run(tmp_path, NUM_GPUS="2", CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert local_devices(argv) == [4, 5]  # not GPUs 0-1
    argv = command(dry_run(tmp_path, NUM_GPUS="4", CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert local_devices(argv) == [4, 5, 6, 7]


def test_num_gpus_beyond_the_visible_devices_is_an_error(tmp_path: Path) -> None:
    result = dry_run(tmp_path, NUM_GPUS="5", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NUM_GPUS=5 but CUDA_VISIBLE_DEVICES='4,5,6,7' lists 4 GPU(s)" in result.stderr
    assert "dry run: command" not in result.stdout


def test_no_gpu_runs_nproc_cpu_ranks(tmp_path: Path) -> None:
    result = dry_run(tmp_path, smi=SMI_NO_DRIVER, NPROC="2")
    argv = command(result)
    assert local_devices(argv) == [0, 1]
    assert value_of(argv, "--use_cpu") == "true"
    assert re.search(r"^dry run: exports OMP_NUM_THREADS=[1-9][0-9]*$", result.stdout, re.MULTILINE), result.stdout


def test_hostfile_from_a_gpu_less_head_launches_gpu_ranks(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# DeepSpeed's format\nworker-0 slots=8\nworker-1 slots=8\n")
    result = dry_run(tmp_path, smi=SMI_NO_DRIVER, HOSTFILE=str(hostfile), MASTER_ADDR="10.0.0.1")
    argv = command(result)
    assert argv[0] == "env" and argv[1].startswith("DS_ENV_FILE=")
    assert argv[3:6] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert value_of(argv, "--hostfile") == str(hostfile)
    assert value_of(argv, "--master_addr") == "10.0.0.1"
    assert "--use_cpu" not in argv and "--num_gpus" not in argv and "--include" not in argv
    assert "dry run: gpus=16 ranks=16 gpus_from=HOSTFILE hosts=2" in result.stdout


def test_hostfile_cpu_ranks_only_when_asked_for(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    argv = command(dry_run(tmp_path, smi=SMI_NO_DRIVER, HOSTFILE=str(hostfile), NPROC="2"))
    assert value_of(argv, "--use_cpu") == "true"
    argv = command(dry_run(tmp_path, "--use_cpu", "true", smi=SMI_NO_DRIVER, HOSTFILE=str(hostfile)))
    assert argv.count("--use_cpu") == 1 and value_of(argv, "--use_cpu") == "true"  # the user's own, passed on
    result = dry_run(tmp_path, HOSTFILE=str(tmp_path / "missing"))
    assert result.returncode == 2 and f"HOSTFILE='{tmp_path / 'missing'}' is not a readable file" in result.stderr


def test_nnodes_uses_torchrun_with_this_nodes_gpus(tmp_path: Path) -> None:
    argv = command(dry_run(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600"))
    assert argv[1:4] == ["-u", "-m", "torch.distributed.run"]
    assert [value_of(argv, flag) for flag in ("--nnodes", "--node_rank", "--nproc_per_node")] == ["2", "1", "8"]
    assert [value_of(argv, flag) for flag in ("--master_addr", "--master_port")] == ["10.0.0.1", "29600"]
    assert "--use_cpu" not in argv


def test_finetune_uses_the_same_rules(tmp_path: Path) -> None:
    argv = command(dry_run(tmp_path, "--finetuning_type", "full", script="finetune.sh", CUDA_VISIBLE_DEVICES="6,7"))
    assert local_devices(argv) == [6, 7]
    assert argv[argv.index(str(REPO_ROOT / "finetune.py")) + 1 :][-2:] == ["--finetuning_type", "full"]


def deepspeed_exports(env_file: Path) -> str:
    """The ``export K=V; ...`` prefix DeepSpeed 0.19's PDSH runner builds from an env file.

    The same rules as ``deepspeed.launcher.runner.main`` (``key, val = line.split('=', 1)``) and
    ``MultiNodeRunner.add_export`` (strip, double quotes around anything outside ``[\\w@%+=:,./-]``),
    without importing DeepSpeed.
    """
    exports: dict[str, str] = {}
    for line in env_file.read_text().splitlines(keepends=True):
        key, value = line.split("=", maxsplit=1)
        value = value.strip()
        if re.search(r"[^\w@%+=:,./-]", value):
            value = f'"{value}"'
        exports[key.strip()] = value
    return "".join(f"export {key}={value}; " for key, value in exports.items())


def test_hostfile_forwards_the_environment_through_a_private_env_file(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    forwarded = {
        "SWANLAB_PROJECT": "my project",  # a space
        "HF_HOME": "/data/hf",
        "HF_TOKEN_PATH": "/data/hf/token",  # where the token is, not the token
        "NCCL_SOCKET_IFNAME": "ib0",
        "CUDA_LAUNCH_BLOCKING": "1",
        "OMP_NUM_THREADS": "4",
        "WANDB_NOTES": 'w$and"b`x`\\y',  # every character the remote shell would read inside double quotes
    }
    # Credentials would be on the pdsh command line (ps, DeepSpeed's `cmd = ...` log line): never forwarded.
    credentials = {
        "SWANLAB_API_KEY": "swan-secret-123",
        "HF_TOKEN": "hf_secret_456",
        "WANDB_API_KEY": "wandb-secret-789",
    }
    user_file = tmp_path / "home" / ".deepspeed_env"
    user_file.parent.mkdir()
    user_file.write_text("MY_CLUSTER_SETTING=from my own file\nDB_PASSWORD=db-secret-012\n\n")
    dead_launch = tmp_path / "home" / ".cache" / "llmtrain" / "deepspeed_env.999999999"
    dead_launch.parent.mkdir(parents=True)
    dead_launch.write_text("OLD=1\n")
    result = dry_run(
        tmp_path, smi=SMI_NO_DRIVER, HOSTFILE=str(hostfile), PYTHONHASHSEED="0", UNRELATED_VAR="x",
        NCCL_DEBUG_FILE="a\nb", **forwarded, **credentials,
    )  # fmt: skip
    argv = command(result)
    env_file = Path(argv[1].removeprefix("DS_ENV_FILE="))
    assert env_file.parent == tmp_path / "home" / ".cache" / "llmtrain"
    assert re.fullmatch(r"deepspeed_env\.[0-9]+", env_file.name)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700
    assert not dead_launch.exists()  # an ended launch's file is cleaned up
    assert user_file.read_text() == "MY_CLUSTER_SETTING=from my own file\nDB_PASSWORD=db-secret-012\n\n"  # not touched
    assert not (tmp_path / ".deepspeed_env").exists()

    # Every variable reaches the remote shell with its exact value; the user's own file still applies.
    names = [line.split("=", 1)[0] for line in env_file.read_text().splitlines()]
    assert set(forwarded) <= set(names) and names[-1] == "MY_CLUSTER_SETTING"
    assert "PYTHONHASHSEED" not in names  # PYTHON* is DeepSpeed's own prefix, forwarded with its PYTHONPATH rule
    assert "UNRELATED_VAR" not in names  # not a job variable
    assert "NCCL_DEBUG_FILE" not in names and "NCCL_DEBUG_FILE is not passed" in result.stderr
    assert not {*credentials, "DB_PASSWORD"} & set(names)
    remote = subprocess.run(
        ["bash", "-c", deepspeed_exports(env_file) + 'for name; do printf "%s=%s\\n" "$name" "${!name}"; done', "-",
         *forwarded, "MY_CLUSTER_SETTING"],
        env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    expected = {**forwarded, "MY_CLUSTER_SETTING": "from my own file"}
    assert remote.stdout == "".join(f"{name}={value}\n" for name, value in expected.items())

    # The dry run names what it forwards and the credentials it holds back, and prints no value of either.
    printed = result.stdout + result.stderr
    for name in forwarded:
        assert name in printed
    (withheld,) = [line for line in result.stderr.splitlines() if "credentials not passed" in line]
    assert withheld.startswith(
        "launch: credentials not passed to the remote ranks: HF_TOKEN SWANLAB_API_KEY WANDB_API_KEY "
        f"DB_PASSWORD (from {user_file}) (DeepSpeed's runner would put them on the pdsh command line"
    )
    assert "`hf auth login` stores the token under HF_HOME, `swanlab login`" in withheld
    for secret in (*credentials.values(), "db-secret-012", "w$and"):
        assert secret not in printed
        assert secret not in env_file.read_text()
