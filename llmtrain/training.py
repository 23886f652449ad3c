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
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from llmtrain.arguments import TrainArguments
from llmtrain.checkpoints import (
    CompleteCheckpointCallback,
    convert_to_universal,
    find_resume_checkpoint,
    list_checkpoints,
    saved_world_size,
)
from llmtrain.errors import USER_ERROR_EXIT_CODE, ConfigError, UserInputError
from llmtrain.faults import FaultInjector
from llmtrain.ledger import DataLedger
from llmtrain.manifest import MANIFEST_FILE, write_manifest
from llmtrain.perf import ThroughputCallback, TokenCounter, enable_memory_efficient_loss
from llmtrain.preemption import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    StepGuardCallback,
    TrainingDiverged,
    TrainingPreempted,
)
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


# Settings that decide which parameters exist and how they are shaped or initialised: a checkpoint
# written under other values would load partially (or into the wrong modules), so resuming is refused.
STRUCTURAL_KEYS = frozenset(
    {
        "model_name_or_path", "config_name", "tokenizer_name_or_path", "finetuning_type", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "layers_to_transform", "trainable_last_n_layers", "train_final_norm",
        "train_lm_head",
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
    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_cli(main: Callable[[list[str]], None]) -> int:
    """Run an entry point's ``main``: bad input is one logged line and exit 2, preemption exit 75,
    a non-finite loss under ``nonfinite_policy: stop`` exit 3."""
    setup_logging()
    try:
        main(sys.argv[1:])
    except UserInputError as error:
        logger.error("%s", error)
        return USER_ERROR_EXIT_CODE
    except TrainingPreempted as stopped:
        logger.warning("%s", stopped)
        return PREEMPTED_EXIT_CODE
    except TrainingDiverged as diverged:
        logger.error("%s", diverged)
        return DIVERGED_EXIT_CODE
    return 0


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

    def __post_init__(self) -> None:
        if not self.run_id:
            saved = _checkpoint_manifest(self.resume_from).get("run_id") if self.resume_from else None
            self.run_id = str(saved) if saved else new_run_id()


def inspect_output_dir(args: TrainArguments, run_config: dict[str, Any]) -> RunStart:
    """Apply the output-dir rules (module docstring) without writing anything; every rank may call it.

    Raises :class:`ConfigError` for an output dir this run must not touch. Nothing is written
    until :func:`open_output_dir`, which the entry points call only once the data and the model
    are built, so a bad input never leaves a half-initialised output dir behind.
    """
    output_dir = Path(str(args.output_dir))
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
    return RunStart(resume_from=resume_from, already_finished=False)


def open_output_dir(args: TrainArguments, run_config: dict[str, Any], start: RunStart) -> None:
    """Create ``output_dir`` (moving an old run aside first under ``start_over``) and record the config.

    Only the main process writes; the other ranks wait for it.
    """
    output_dir = Path(str(args.output_dir))
    with args.main_process_first(local=False, desc="open output_dir"):
        if args.should_save:
            if start.archive_first:
                _archive(output_dir)
            probe = output_dir / f".write-probe-{os.getpid()}"
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                probe.write_text("")
                probe.unlink()
            except OSError as error:
                raise ConfigError(f"output_dir {output_dir} is not writable: {error.strerror}") from error
            (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=True))


def _check_structure_unchanged(checkpoint: Path, run_config: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` under settings that change the trained parameters (STRUCTURAL_KEYS)."""
    saved = _checkpoint_manifest(checkpoint).get("config", {})
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


def _checkpoint_manifest(checkpoint: Path) -> dict[str, Any]:
    """The ``run_manifest.json`` a checkpoint holds, or {} for one written before manifests existed."""
    path = checkpoint / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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


class LlmTrainer(Trainer):
    """The HF Trainer plus a data-order ledger, the non-finite guard and the fault-injection points.

    A non-finite gradient norm never reaches the weights: DeepSpeed's ZeRO optimizer skips such
    an update itself (its overflow check covers fp32, fp16 and bf16); without DeepSpeed the
    gradients are dropped before ``optimizer.step()``. So a NaN micro-batch costs its whole
    optimizer step (all micro-batches of it) under ``nonfinite_policy: skip``.

    Everything else (loss, DeepSpeed, resume of model/optimizer/scheduler/RNG state and the
    skip-based data resume) is the stock Trainer's.
    """

    def __init__(self, *args: Any, step_guard: StepGuardCallback, ledger: DataLedger, faults: FaultInjector,
                 token_counter: TokenCounter, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter
        self.step_guard = step_guard
        self.ledger = ledger
        self.faults = faults

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        if len(self.ledger.pending) == 1:  # the first micro-batch of this step is back-propagated by now
            self.faults.maybe_kill("kill_in_accumulation", step)
        micro_batch = len(self.ledger.pending)
        self.ledger.record(inputs)
        self.token_counter.observe(inputs)
        loss: Any = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if micro_batch == 0 and self.args.process_index == 0 and self.faults.armed("nan_loss", step):
            loss = loss * float("nan")
        # Checked at the step's end. A NaN/inf loss is back-propagated as it is, so every rank runs the
        # same collectives; its gradients make the step's gradient norm non-finite, and that update is skipped.
        self.step_guard.watch_loss(loss)
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            if not self.is_deepspeed_enabled:
                model.zero_grad(set_to_none=True)  # optimizer.step() leaves parameters without gradients alone
            self.step_guard.report_nonfinite(
                self.state.global_step + 1, f"gradient norm {float(norm)}; this optimizer update is skipped"
            )
        return norm


class RunRecordCallback(TrainerCallback):
    """Appends each step's data-order ledger line and fires the step-level fault points."""

    def __init__(self, ledger: DataLedger, faults: FaultInjector) -> None:
        self.ledger = ledger
        self.faults = faults

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.faults.first_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.ledger.end_step(state.global_step)
        self.faults.maybe_kill("kill_after_step", state.global_step)


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    manifest: dict[str, Any],
) -> LlmTrainer:
    """A Trainer with complete-checkpoint marking, the step guard, the ledger, perplexity and SwanLab.

    ``manifest`` (see :mod:`llmtrain.manifest`) is written into every checkpoint; its ``run_id``
    names the SwanLab run.
    """
    eval_strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is None and eval_strategy != "no":
        raise ConfigError(
            f"eval_strategy={eval_strategy!r} but there is no validation data: set "
            "validation_files or validation_split_percentage > 0, or eval_strategy: 'no'"
        )
    # The Trainer rotates by mtime before the other ranks finish saving; ours waits for the marker.
    keep_checkpoints, args.save_total_limit = args.save_total_limit, None
    faults = FaultInjector(Path(str(args.output_dir)))
    ledger = DataLedger(Path(str(args.output_dir)), args.process_index)
    step_guard = StepGuardCallback(args.nonfinite_policy)
    token_counter = TokenCounter()
    if args.loss_implementation != "standard":
        enable_memory_efficient_loss(model, backend=args.loss_implementation)
    seq_len = manifest["config"].get("block_size") or manifest["config"].get("max_seq_length")
    return LlmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[
            PerplexityCallback(),
            ThroughputCallback(token_counter, model.config, seq_len),  # before SwanLab, which logs its keys
            RunRecordCallback(ledger, faults),  # the step's ledger line is written before a guard can stop
            step_guard,
            CompleteCheckpointCallback(keep=keep_checkpoints, manifest=manifest, faults=faults),
            *swanlab_callbacks(args, manifest["config"], manifest["run_id"]),
        ],
        token_counter=token_counter,
        step_guard=step_guard,
        ledger=ledger,
        faults=faults,
    )


def _adapt_to_world_size(trainer: LlmTrainer, checkpoint: Path) -> None:
    """Resume a ZeRO checkpoint written by a different number of ranks through a universal checkpoint.

    ZeRO-2 partitions the optimizer state by rank, so DeepSpeed refuses such a checkpoint as it
    is. The main process converts it once (``deepspeed.checkpoint.ds_to_universal``) and every
    rank loads the universal form. The data order cannot continue exactly: the global batch
    changes with the world size unless the per-device batch or accumulation is changed to match.
    """
    args = trainer.args
    saved = saved_world_size(checkpoint)
    if saved is None or saved == args.world_size or not trainer.is_deepspeed_enabled:
        return
    logger.warning(
        "%s was written by %d rank(s), this run has %d: converting it to a universal checkpoint. The global batch "
        "and the data order differ from the original run's from here on (per_device_train_batch_size x "
        "gradient_accumulation_steps x world size sets the global batch)",
        checkpoint,
        saved,
        args.world_size,
    )
    with args.main_process_first(local=False, desc="universal checkpoint"):
        if args.should_save:
            convert_to_universal(checkpoint)
    plugin: Any = trainer.accelerator.state.deepspeed_plugin
    plugin.hf_ds_config.config.setdefault("checkpoint", {})["load_universal"] = True


def train_and_save(trainer: LlmTrainer, start: RunStart, manifest: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if ``start`` says so), save the final model, summary and loss curve.

    Returns the summary written to ``train_summary.json``.
    """
    args = trainer.args
    if start.resume_from is not None:
        _adapt_to_world_size(trainer, start.resume_from)
    result = trainer.train(resume_from_checkpoint=str(start.resume_from) if start.resume_from else None)
    output_dir = Path(str(args.output_dir))
    guard = trainer.step_guard
    if guard.preempted_at_step is not None:
        raise TrainingPreempted(
            f"stopped on {guard.signal_name or 'a signal on another rank'} after saving "
            f"{output_dir / f'checkpoint-{guard.preempted_at_step}'}; rerun the same command to resume"
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
        "skipped_nonfinite": guard.skipped_nonfinite,
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
