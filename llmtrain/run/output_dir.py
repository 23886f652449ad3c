"""Output-dir rules and run identity: what a launch finds in ``output_dir`` and what it may do there.

Output-dir rules, checked before anything is written:

* nothing there, or only logs: train from step 0;
* checkpoints there: resume from the newest complete one (no flag needed);
* this exact run already finished there: say so and exit 0;
* a finished model of another run there: refuse, unless ``--start_over true``, which moves
  everything aside to ``output_dir/previous/<time>/`` (nothing is deleted);
* another live launch holds ``output_dir/.llmtrain.lock``: refuse at once, naming its host, pid
  and start time; the main process holds that lock from :func:`open_output_dir` to its exit, and a
  lock left by a dead process is taken over (:mod:`llmtrain.run.lock`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtrain.config.arguments import TrainArguments, resume_keys
from llmtrain.errors import ConfigError
from llmtrain.paths import writable_problem
from llmtrain.run.checkpoints import find_resume_checkpoint
from llmtrain.run.completeness import list_checkpoints
from llmtrain.run.lock import LOCK_FILE, OutputDirLock, check_not_held
from llmtrain.run.manifest import read_manifest

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
# The run id (SwanLab's experiment id) as soon as the output dir is opened: a run killed before its
# first checkpoint keeps its id, so the restart continues the same experiment.
RUN_ID_FILE = "run_id"
SUMMARY_FILE = "train_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
FINAL_STAGING_DIR = ".final-partial"
ARCHIVE_DIR = "previous"
# The launcher logs and the lock of the current launch stay put.
KEPT_ON_START_OVER = frozenset({"logs", ARCHIVE_DIR, LOCK_FILE})
FINAL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Settings that may differ between launches of the same run (logging, launch topology, tracking): the fields
# whose rule says so (llmtrain.config.arguments, "Field rules"); every other recorded setting is the run's identity.
VOLATILE_KEYS = resume_keys("volatile")
# Settings that decide which parameters exist and how they are shaped or initialised: a checkpoint
# written under other values would load partially (or into the wrong modules), so resuming is refused.
STRUCTURAL_KEYS = resume_keys("structural")


def run_identity(run_config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run: everything but logging, launch and tracking knobs."""
    return {key: value for key, value in run_config.items() if key not in VOLATILE_KEYS}


@dataclass
class RunStart:
    """What the output dir says about this launch."""

    resume_from: Path | None
    already_finished: bool
    # start_over with something in output_dir: move it aside to previous/ when the dir is opened.
    archive_first: bool = False
    # Names the experiment in trackers (SwanLab's run id); kept in every checkpoint so a resume continues it.
    run_id: str = ""

    @property
    def resumed_step(self) -> int:
        """The global step of the checkpoint this launch resumes (0 when it starts from scratch)."""
        return int(self.resume_from.name.rsplit("-", 1)[-1]) if self.resume_from is not None else 0

    def __post_init__(self) -> None:
        if not self.run_id:
            saved = read_manifest(self.resume_from).get("run_id") if self.resume_from else None
            self.run_id = str(saved) if saved else new_run_id()


def _saved_run_id(output_dir: Path) -> str:
    """The id recorded when this run first opened ``output_dir``, or "" (see :data:`RUN_ID_FILE`)."""
    path = output_dir / RUN_ID_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def inspect_output_dir(args: TrainArguments, run_config: dict[str, Any]) -> RunStart:
    """Apply the output-dir rules (module docstring) without writing anything; every rank may call it.

    Raises :class:`ConfigError` for an output dir this run must not touch. Nothing is written
    until :func:`open_output_dir`, which the entry points call only once the data and the model
    are built, so a bad input never leaves a half-initialised output dir behind.
    """
    output_dir = Path(str(args.output_dir))
    # First: another launch's files are not ours to judge. Only the process that would take the lock
    # checks it: under NNODES the other nodes' ranks would see a crashed main process's lock (another
    # host, heartbeat still fresh) as live and refuse the restart.
    if args.should_save:
        check_not_held(output_dir / LOCK_FILE)
    saved_config_path = output_dir / RUN_CONFIG_FILE
    saved_config = yaml.safe_load(saved_config_path.read_text()) if saved_config_path.is_file() else None
    has_model = any((output_dir / name).is_file() for name in FINAL_MODEL_FILES)
    checkpoints = list_checkpoints(output_dir)
    differing = _differing_keys(saved_config, run_config)
    same_run = saved_config is not None and not differing

    if args.start_over and (has_model or checkpoints or saved_config is not None):
        return RunStart(resume_from=None, already_finished=False, archive_first=True)
    if has_model and not same_run:
        detail = f"settings differ: {', '.join(differing)}" if saved_config is not None else "no run_config.yaml"
        raise ConfigError(
            f"output_dir {output_dir} holds a finished model of another run ({detail}); "
            "pass --start_over true to move it aside, or choose another output_dir"
        )
    if same_run and (output_dir / SUMMARY_FILE).is_file():
        logger.info("%s already holds the finished model of this run; nothing to do", output_dir)
        return RunStart(resume_from=None, already_finished=True)
    resume_from = find_resume_checkpoint(output_dir)
    if resume_from is not None:
        _check_structure_unchanged(resume_from, run_config)
        logger.info("resuming from %s (step %s)", resume_from, resume_from.name.split("-")[-1])
    if checkpoints and differing and saved_config is not None:
        logger.warning("resuming with changed settings: %s", ", ".join(differing))
    # Restarted before its first checkpoint: the same run (same settings) keeps its id.
    run_id = _saved_run_id(output_dir) if resume_from is None and same_run else ""
    return RunStart(resume_from=resume_from, already_finished=False, run_id=run_id)


def open_output_dir(args: TrainArguments, run_config: dict[str, Any], start: RunStart) -> OutputDirLock:
    """Lock ``output_dir``, move an old run aside first under ``start_over``, and record the config.

    Only the main process writes; the other ranks wait for it. The main process takes the lock
    (:mod:`llmtrain.run.lock`) before writing anything, and raises :class:`ConfigError` naming the
    holder if another launch got it first. Returns the lock, to ``release()`` when the run ends
    (it is released at exit anyway); on the other ranks it is a handle that holds nothing.
    """
    output_dir = Path(str(args.output_dir))
    lock = OutputDirLock(output_dir / LOCK_FILE)
    with args.main_process_first(local=False, desc="open output_dir"):
        if args.should_save:
            problem = writable_problem(output_dir)
            try:
                if problem is None:
                    output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                problem = str(error.strerror or error)
            if problem is not None:
                raise ConfigError(f"output_dir {output_dir} is not writable: {problem}")
            lock.acquire(run_id=start.run_id)
            try:
                if start.archive_first:
                    _archive(output_dir)
                (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=True))
                if _saved_run_id(output_dir) != start.run_id:
                    (output_dir / RUN_ID_FILE).write_text(start.run_id + "\n", encoding="utf-8")
            except BaseException:
                lock.release()
                raise
    return lock


def _check_structure_unchanged(checkpoint: Path, run_config: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` under settings that change the trained parameters (STRUCTURAL_KEYS)."""
    saved = read_manifest(checkpoint).get("config", {})
    changed = sorted(key for key in STRUCTURAL_KEYS if key in saved and saved[key] != run_config.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved[key]!r} -> {run_config.get(key)!r}" for key in changed)
        raise ConfigError(
            f"output_dir {checkpoint.parent}: {checkpoint.name} was trained with other model/adapter settings "
            f"({details}); resuming would load it partially. Restore those settings, choose another output_dir, "
            "or pass --start_over true to move the old run aside"
        )


def new_run_id() -> str:
    """A fresh run id: 21 lowercase letters and digits, the shape SwanLab's own ids have."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(21))


def _differing_keys(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    if saved is None:
        return []
    # Only keys both configs record: a key one of them lacks was added or dropped by another version of
    # this project (or stopped being treated as a secret), not changed by the user.
    saved_identity, current_identity = run_identity(saved), run_identity(current)
    keys = set(saved_identity) & set(current_identity)
    return sorted(key for key in keys if saved_identity[key] != current_identity[key])


def _archive(output_dir: Path) -> None:
    archive = output_dir / ARCHIVE_DIR / time.strftime("%Y%m%d-%H%M%S")
    archive.mkdir(parents=True)
    for entry in sorted(output_dir.iterdir()):
        if entry.name not in KEPT_ON_START_OVER:
            shutil.move(str(entry), archive / entry.name)
    logger.warning("start_over: moved the previous contents of %s to %s", output_dir, archive)
