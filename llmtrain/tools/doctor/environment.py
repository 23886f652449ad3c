"""The environment checks: libraries against requirements.txt's pins, the launcher's GPUs and ranks against torch."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from llmtrain.config.arguments import TrainArguments
from llmtrain.paths import REQUIREMENTS_FILE
from llmtrain.tools.doctor.report import OK, WARNING, PreflightError, Report
from llmtrain.topology import Topology, launch_topology

# Distribution name = import name for each of these.
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "deepspeed",
    "peft",
    "swanlab",
    "torchdata",
)


# --- libraries -------------------------------------------------------------------------------


def read_pins(path: Path) -> dict[str, str]:
    """``name: version`` for every ``name[extras]==version`` line of a requirements file.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "r.txt"
    >>> _ = p.write_text("# pins\\ntorch==2.1.0\\nswanlab[dashboard]==0.1\\nx>=1\\n")
    >>> read_pins(p)
    {'torch': '2.1.0', 'swanlab': '0.1'}
    """
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, version = (part.strip() for part in line.split("==", 1))
        pins[name.split("[", 1)[0].strip().lower()] = version
    return pins


def _same_release(installed: str, pinned: str) -> bool:
    """Equal versions, ignoring a local label such as torch's ``+cpu`` / ``+cu124``.

    >>> _same_release("2.5.1+cpu", "2.5.1"), _same_release("2.5.1", "2.5.0")
    (True, False)
    """
    from packaging.version import InvalidVersion, Version

    try:
        return Version(Version(installed).public) == Version(pinned)
    except InvalidVersion:
        return installed.split("+", 1)[0] == pinned


def check_libraries(report: Report, fast: bool, requirements: Path = REQUIREMENTS_FILE) -> None:
    """One line per library: missing or failing to import is an error, an unpinned version a warning."""
    pins = read_pins(requirements) if requirements.is_file() else {}
    if not pins:
        report.add(OK, "libraries", f"no pins found ({requirements} missing or empty): versions not compared")
    for name in LIBRARIES:
        report.attempt(f"library {name}", functools.partial(_check_library, report, name, pins.get(name), fast))


def _check_library(report: Report, name: str, pin: str | None, fast: bool) -> None:
    if importlib.util.find_spec(name) is None:
        raise PreflightError(f"not installed (pip install -r {REQUIREMENTS_FILE.name})")
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if not fast:
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken install can raise anything at import (CUDA, ABI, missing deps)
            raise PreflightError(f"{version} is installed but fails to import: {error}") from error
    if pin is None:
        report.add(OK, f"library {name}", f"{version} (not pinned)")
    elif _same_release(version, pin):
        report.add(OK, f"library {name}", f"{version} (pinned {pin})")
    else:
        report.add(WARNING, f"library {name}", f"{version} installed, but requirements.txt pins {pin}")


# --- GPUs and ranks ----------------------------------------------------------------------------


def check_gpus(report: Report, training_args: TrainArguments | None) -> None:
    """What the launcher will start (its own rule, :func:`llmtrain.topology.launch_topology`) against what torch sees.

    The launcher takes ``NUM_GPUS`` (the first ones ``CUDA_VISIBLE_DEVICES`` lists, when it is set),
    else the devices ``CUDA_VISIBLE_DEVICES`` lists, else every GPU nvidia-smi lists; with none it
    runs ``NPROC`` CPU ranks (default 1) on gloo with ``--use_cpu``. More GPUs than torch sees is an
    error: those ranks would fail to start. Under ``HOSTFILE`` the hostfile's slots are the ranks,
    on its hosts, so this node's GPUs are not compared.
    """
    visible = torch.cuda.device_count()
    topology = launch_topology()
    gpus = topology.gpus
    if topology.gpus_from == "HOSTFILE":
        _report_hostfile(report, topology, training_args)
        return
    if topology.gpus_from == "NUM_GPUS":
        if gpus > visible:
            raise PreflightError(f"NUM_GPUS={gpus} but torch sees {visible} GPU(s) on this node")
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        source = f"NUM_GPUS={gpus}" + (f" of CUDA_VISIBLE_DEVICES={listed}" if listed else "")
    elif topology.gpus_from == "CUDA_VISIBLE_DEVICES":
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if gpus > visible:
            raise PreflightError(f"CUDA_VISIBLE_DEVICES={listed!r} lists {gpus} GPU(s) but torch sees {visible}")
        source = f"CUDA_VISIBLE_DEVICES={listed}"
    elif topology.gpus_from == "nvidia-smi":
        if gpus > visible:
            raise PreflightError(f"nvidia-smi lists {gpus} GPU(s) but torch sees {visible}")
        source = f"torch sees {visible}" if gpus == visible else f"nvidia-smi lists {gpus}"
    else:  # no nvidia-smi on PATH: the launcher starts CPU ranks whatever torch sees
        source = "nvidia-smi not found" if visible else f"torch sees {visible}"
    if gpus > 0:
        names = sorted({torch.cuda.get_device_name(index) for index in range(gpus)})
        report.add(OK, "gpus", f"{gpus} GPU rank(s) of {visible} visible ({source}; {', '.join(names)})")
        if training_args is not None and training_args.use_cpu:
            report.add(WARNING, "gpus", "use_cpu is set: training will ignore the GPUs")
        return
    report.add(OK, "gpus", f"no GPU ({source}): CPU: {topology.ranks} rank(s) on gloo, --use_cpu")
    if topology.gpus_from == "none" and visible:
        report.add(WARNING, "gpus", "nvidia-smi is not on PATH, so the launcher will not use the GPUs torch sees")
    _warn_bf16_on_cpu(report, training_args)


def _report_hostfile(report: Report, topology: Topology, training_args: TrainArguments | None) -> None:
    """HOSTFILE: GPU ranks on the hostfile's slots, unless NPROC or ``--use_cpu true`` asks for CPU ranks."""
    on_cpu = topology.gpus == 0 or (training_args is not None and training_args.use_cpu)
    why = (" (NPROC is set)" if topology.gpus == 0 else " (--use_cpu true)") if on_cpu else ""
    kind = f"CPU rank(s) on gloo{why}" if on_cpu else "GPU rank(s)"
    report.add(
        OK,
        "gpus",
        f"HOSTFILE={os.environ.get('HOSTFILE', '')}: {topology.ranks} {kind} over {topology.hosts} host(s), "
        "the hostfile's slots (the hosts themselves are not checked from here)",
    )
    if on_cpu:
        _warn_bf16_on_cpu(report, training_args)


def _warn_bf16_on_cpu(report: Report, training_args: TrainArguments | None) -> None:
    if training_args is not None and training_args.bf16:
        report.add(WARNING, "gpus", "bf16 is requested on CPU: it works but is ~3x slower than fp32 (--bf16 false)")
