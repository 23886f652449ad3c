"""The launch topology, defined once: how many GPUs a launch uses and how many ranks it starts.

Read by the launcher (:mod:`llmtrain.launch`) to build its command and by the preflight
(:mod:`llmtrain.tools.doctor`) to compare it with what torch sees. Light: standard library only,
plus one ``nvidia-smi -L`` when no variable decides the GPU count.

Rules, from the environment:

* ``HOSTFILE`` (DeepSpeed's format: ``host slots=N`` lines, ``#`` comments) wins: the ranks are the
  hostfile's slots, summed over its hosts; this node's own GPUs (often none on a head node) do not
  count. They are GPU ranks unless ``NPROC`` is set, which asks for CPU ranks (the slots still say
  how many per host). ``NUM_GPUS`` and ``CUDA_VISIBLE_DEVICES`` are ignored there.
* On one node: ``NUM_GPUS`` wins, then ``CUDA_VISIBLE_DEVICES`` (set but empty means none), then every
  GPU ``nvidia-smi`` lists (none without nvidia-smi). ``NUM_GPUS`` with ``CUDA_VISIBLE_DEVICES`` takes
  the first ``NUM_GPUS`` devices listed; ``devices`` is the list DeepSpeed's ``--include`` gets, empty
  when ``CUDA_VISIBLE_DEVICES`` is not set.
* Ranks: one per GPU; with no GPU, ``NPROC`` CPU ranks (default 1).

A ``NUM_GPUS`` or ``NPROC`` that is not a whole number, ``NPROC=0``, ``NUM_GPUS`` above the devices
``CUDA_VISIBLE_DEVICES`` lists, or a missing or malformed ``HOSTFILE`` raises :class:`ConfigError`
with one line naming the variable.

>>> launch_topology({"NPROC": "2", "CUDA_VISIBLE_DEVICES": ""})
Topology(gpus=0, ranks=2, gpus_from='CUDA_VISIBLE_DEVICES', hosts=1, devices='')
>>> launch_topology({"NUM_GPUS": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}).devices
'4,5'
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import ConfigError

NVIDIA_SMI_TIMEOUT_S = 30  # nvidia-smi answers in milliseconds; only a hung driver takes longer
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=([0-9]+)")
WHOLE_NUMBER = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class Topology:
    """What a launch starts: the GPUs it uses, its ranks, and which setting decided them."""

    gpus: int  # GPUs used; 0 means CPU ranks on gloo with --use_cpu
    ranks: int  # processes started on this node (under HOSTFILE: on all the hostfile's hosts)
    gpus_from: str  # what decided ``gpus``: HOSTFILE, NUM_GPUS, CUDA_VISIBLE_DEVICES, nvidia-smi or none
    hosts: int = 1  # the hostfile's hosts under HOSTFILE, else this node
    devices: str = ""  # the CUDA_VISIBLE_DEVICES entries for DeepSpeed's --include, or empty

    def describe(self) -> str:
        """The dry run's line: ``gpus=N ranks=N gpus_from=WHAT hosts=N`` and the kind of ranks.

        >>> Topology(0, 2, "HOSTFILE", 2).describe()
        'gpus=0 ranks=2 gpus_from=HOSTFILE hosts=2 (2 CPU rank(s) on gloo)'
        """
        kind = f"{self.ranks} GPU rank(s)" if self.gpus else f"{self.ranks} CPU rank(s) on gloo"
        return f"gpus={self.gpus} ranks={self.ranks} gpus_from={self.gpus_from} hosts={self.hosts} ({kind})"


def whole_number(name: str, value: str) -> int:
    """``value`` as a decimal whole number (a leading 0 is not octal), or a one-line error naming ``name``.

    >>> whole_number("NPROC", "08")
    8
    >>> whole_number("NPROC", "two")
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: NPROC='two' must be a whole number
    """
    if not WHOLE_NUMBER.match(value):
        raise ConfigError(f"{name}='{value}' must be a whole number")
    return int(value)


def read_hostfile(path: str) -> tuple[int, int]:
    """``HOSTFILE`` -> (slots summed over its hosts, hosts), read as DeepSpeed's runner reads it.

    DeepSpeed itself falls back to this node alone for a missing file; here that is an error.
    """
    file = Path(path)
    if not file.is_file() or not os.access(file, os.R_OK):
        raise ConfigError(f"HOSTFILE='{path}' is not a readable file")
    slots = 0
    seen: set[str] = set()
    for raw in file.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None:
            raise ConfigError(f"HOSTFILE={path}: bad line '{line}' (DeepSpeed's format is 'host slots=N')")
        host = match.group(1)
        if host in seen:
            raise ConfigError(f"HOSTFILE={path} lists host {host} twice")
        seen.add(host)
        slots += int(match.group(2))
    if slots < 1:
        raise ConfigError(f"HOSTFILE={path} lists no slots (DeepSpeed's format is 'host slots=N')")
    return slots, len(seen)


def nvidia_smi_gpus(executable: str) -> int:
    """GPUs ``nvidia-smi -L`` lists; 0 when it fails (no driver). Raises :class:`ConfigError` when it hangs."""
    try:
        result = subprocess.run(
            [executable, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise ConfigError(f"nvidia-smi did not answer in {NVIDIA_SMI_TIMEOUT_S} s (is the driver hanging?)") from error
    return sum(line.startswith("GPU") for line in result.stdout.splitlines())


def launch_topology(environ: Mapping[str, str] | None = None) -> Topology:
    """The topology the variables in ``environ`` (default: this process's environment) ask for (module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("HOSTFILE"):
        slots, hosts = read_hostfile(env["HOSTFILE"])
        if env.get("NPROC"):
            whole_number("NPROC", env["NPROC"])  # any value asks for CPU ranks; a bad one is still an error
            return Topology(0, slots, "HOSTFILE", hosts)
        return Topology(slots, slots, "HOSTFILE", hosts)
    devices = ""
    listed_devices = env.get("CUDA_VISIBLE_DEVICES")
    if env.get("NUM_GPUS"):
        gpus = whole_number("NUM_GPUS", env["NUM_GPUS"])
        gpus_from = "NUM_GPUS"
        if listed_devices is not None:
            listed = listed_devices.split(",") if listed_devices else []
            if gpus > len(listed):
                raise ConfigError(
                    f"NUM_GPUS={gpus} but CUDA_VISIBLE_DEVICES='{listed_devices}' lists {len(listed)} GPU(s)"
                )
            devices = ",".join(listed[:gpus])
    elif listed_devices is not None:
        gpus = len(listed_devices.split(",")) if listed_devices else 0
        gpus_from = "CUDA_VISIBLE_DEVICES"
        devices = listed_devices
    elif (smi := shutil.which("nvidia-smi", path=env.get("PATH"))) is not None:
        gpus = nvidia_smi_gpus(smi)
        gpus_from = "nvidia-smi"
    else:
        gpus, gpus_from = 0, "none"
    if gpus > 0:
        return Topology(gpus, gpus, gpus_from, 1, devices)
    ranks = whole_number("NPROC", env.get("NPROC") or "1")
    if ranks < 1:
        raise ConfigError("NPROC must be at least 1")
    return Topology(0, ranks, gpus_from, 1, "")
