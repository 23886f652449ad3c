"""Trainer set-up, output-dir rules, automatic resume and the final save, shared by every stage.

Output-dir rules, checked before anything is written:

* nothing there, or only logs: train from step 0;
* checkpoints there: resume from the newest complete one (no flag needed);
* this exact run already finished there: say so and exit 0;
* a finished model of another run there: refuse, unless ``--start_over true``, which moves
  everything aside to ``output_dir/previous/<time>/`` (nothing is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from llmtrain.arguments import TrainArguments
from llmtrain.checkpoints import CompleteCheckpointCallback, find_resume_checkpoint, list_checkpoints
from llmtrain.errors import USER_ERROR_EXIT_CODE, ConfigError, UserInputError
from llmtrain.manifest import write_manifest
from llmtrain.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, TrainingPreempted
from llmtrain.tracking import PerplexityCallback, plot_loss_curve, swanlab_callbacks

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
SUMMARY_FILE = "train_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
FINAL_STAGING_DIR = ".final-partial"
ARCHIVE_DIR = "previous"
KEPT_ON_START_OVER = frozenset({"logs", ARCHIVE_DIR})  # launcher logs of the current launch stay put
FINAL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Settings that may differ between launches of the same run (logging, launch topology, tracking).
VOLATILE_KEYS = frozenset(
    {
        "start_over", "local_rank", "report_to", "logging_steps", "logging_first_step", "logging_strategy",
        "save_steps", "save_strategy", "save_total_limit", "eval_steps", "dataloader_num_workers",
        "ddp_timeout", "deepspeed", "use_cpu", "disable_tqdm", "log_level", "log_level_replica",
        "swanlab_project", "swanlab_experiment_name", "swanlab_mode", "swanlab_log_dir",
        "prepare_only", "preprocessing_num_workers", "tokenized_path", "dataset_cache_dir", "run_name",
    }
)  # fmt: skip


def setup_logging() -> None:
    """Console logging for entry points: INFO on the launcher's rank 0, warnings on the others.

    ``RANK`` (set by every launcher) is read here because arguments are logged while being
    parsed, before the Trainer knows the rank; :func:`set_rank_log_level` takes over after.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        stream=sys.stdout,
    )
    # DeepSpeed probes for libaio with a test compile at import; its gcc lines are not ours to show.
    logging.getLogger("compilers").setLevel(logging.WARNING)


def set_rank_log_level(args: TrainArguments) -> None:
    """INFO on the main process, warnings and errors only on the others."""
    level = logging.INFO if args.should_log else logging.WARNING
    logging.getLogger().setLevel(level)
    # transformers and datasets log every config they load at INFO; keep their warnings only,
    # except the Trainer's own run banner.
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.get_logger("transformers.trainer").setLevel(level)


def disable_unused_cpu_ops() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU-only machines.

    It serves inference all-reduce only (training goes through gloo) but costs a ~50 s
    C++ build on a cold cache; measured to leave training identical.
    """
    import torch

    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_cli(main: Callable[[list[str]], None]) -> int:
    """Run an entry point's ``main``: bad input is one logged line and exit 2, preemption exit 75."""
    setup_logging()
    try:
        main(sys.argv[1:])
    except UserInputError as error:
        logger.error("%s", error)
        return USER_ERROR_EXIT_CODE
    except TrainingPreempted as stopped:
        logger.warning("%s", stopped)
        return PREEMPTED_EXIT_CODE
    return 0


def run_identity(run_config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run: everything but logging, launch and tracking knobs."""
    return {key: value for key, value in run_config.items() if key not in VOLATILE_KEYS}


@dataclass
class RunStart:
    """What the output dir says about this launch."""

    resume_from: Path | None
    already_finished: bool


def prepare_output_dir(args: TrainArguments, run_config: dict[str, Any]) -> RunStart:
    """Apply the output-dir rules (module docstring); the main process moves and writes, others only read."""
    output_dir = Path(str(args.output_dir))
    with args.main_process_first(local=False, desc="check output_dir"):
        start = _inspect_output_dir(output_dir, run_config, args.start_over, may_write=args.should_save)
        if args.should_save and not start.already_finished:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=True))
    if start.resume_from is not None:
        logger.info("resuming from %s (step %s)", start.resume_from, start.resume_from.name.split("-")[-1])
    return start


def _inspect_output_dir(output_dir: Path, run_config: dict[str, Any], start_over: bool, may_write: bool) -> RunStart:
    saved_config_path = output_dir / RUN_CONFIG_FILE
    saved_config = yaml.safe_load(saved_config_path.read_text()) if saved_config_path.is_file() else None
    has_model = any((output_dir / name).is_file() for name in FINAL_MODEL_FILES)
    checkpoints = list_checkpoints(output_dir)
    differing = _differing_keys(saved_config, run_config)
    same_run = saved_config is not None and not differing

    if start_over and (has_model or checkpoints or saved_config is not None):
        if may_write:
            _archive(output_dir)
        return RunStart(resume_from=None, already_finished=False)
    if has_model and not same_run:
        detail = f"settings differ: {', '.join(differing)}" if saved_config is not None else "no run_config.yaml"
        raise ConfigError(
            f"output_dir {output_dir} holds a finished model of another run ({detail}); "
            "pass --start_over true to move it aside, or choose another output_dir"
        )
    if same_run and (output_dir / SUMMARY_FILE).is_file():
        logger.info("%s already holds the finished model of this run; nothing to do", output_dir)
        return RunStart(resume_from=None, already_finished=True)
    if checkpoints and differing and saved_config is not None:
        logger.warning("resuming with changed settings: %s", ", ".join(differing))
    return RunStart(resume_from=find_resume_checkpoint(output_dir), already_finished=False)


def _differing_keys(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    if saved is None:
        return []
    saved_identity, current_identity = run_identity(saved), run_identity(current)
    keys = set(saved_identity) | set(current_identity)
    return sorted(key for key in keys if saved_identity.get(key) != current_identity.get(key))


def _archive(output_dir: Path) -> None:
    archive = output_dir / ARCHIVE_DIR / time.strftime("%Y%m%d-%H%M%S")
    archive.mkdir(parents=True)
    for entry in sorted(output_dir.iterdir()):
        if entry.name not in KEPT_ON_START_OVER:
            shutil.move(str(entry), archive / entry.name)
    logger.warning("start_over: moved the previous contents of %s to %s", output_dir, archive)


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    manifest: dict[str, Any],
) -> Trainer:
    """A Trainer with complete-checkpoint marking, perplexity logging and, when asked for, SwanLab.

    ``manifest`` (see :mod:`llmtrain.manifest`) is written into every checkpoint.
    """
    eval_strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is None and eval_strategy != "no":
        raise ConfigError(
            f"eval_strategy={eval_strategy!r} but there is no validation data: set "
            "validation_files or validation_split_percentage > 0, or eval_strategy: 'no'"
        )
    # The Trainer rotates by mtime before the other ranks finish saving; ours waits for the marker.
    keep_checkpoints, args.save_total_limit = args.save_total_limit, None
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[
            PerplexityCallback(),
            CompleteCheckpointCallback(keep=keep_checkpoints, manifest=manifest),
            PreemptionCallback(),
            *swanlab_callbacks(args, manifest["config"]),
        ],
    )


def train_and_save(trainer: Trainer, start: RunStart, manifest: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if ``start`` says so), save the final model, summary and loss curve.

    Returns the summary written to ``train_summary.json``.
    """
    args = trainer.args
    result = trainer.train(resume_from_checkpoint=str(start.resume_from) if start.resume_from else None)
    output_dir = Path(str(args.output_dir))
    preemption = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PreemptionCallback))
    if preemption.preempted_at_step is not None:
        raise TrainingPreempted(
            f"stopped on {preemption.signal_name or 'a signal on another rank'} after saving "
            f"{output_dir / f'checkpoint-{preemption.preempted_at_step}'}; rerun the same command to resume"
        )
    # Trained with the cache off (see build_model); inference wants it back on.
    model: Any = trainer.model
    model.config.use_cache = True
    # Saved aside, then moved in: output_dir never holds a half-written final model.
    staging = output_dir / FINAL_STAGING_DIR
    trainer.save_model(str(staging))
    if args.should_save:
        write_manifest(staging, manifest, trainer.state.global_step)
        for path in sorted(staging.iterdir()):
            os.replace(path, output_dir / path.name)
        staging.rmdir()
    engine: Any = trainer.model_wrapped
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from": str(start.resume_from) if start.resume_from else None,
        "world_size": args.world_size,
        "deepspeed": trainer.is_deepspeed_enabled,
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        "train_loss": result.training_loss,
        "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
    }
    if args.should_save:
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILE)
        summary_tmp = output_dir / f".{SUMMARY_FILE}.tmp"
        summary_tmp.write_text(json.dumps(summary, indent=2))
        os.replace(summary_tmp, output_dir / SUMMARY_FILE)
        logger.info(
            "finished at step %d (engine %s, ZeRO stage %s, world size %d); model saved to %s",
            summary["global_step"],
            summary["engine"],
            summary["zero_stage"],
            summary["world_size"],
            output_dir,
        )
    return summary
