"""Training to the end: the Trainer built in ``output_dir``, world-size adaptation on resume, the staged final save."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmtrain.compat import load_universal_checkpoint
from llmtrain.config.arguments import TrainArguments
from llmtrain.data.cache import CheckSources, PreparedData
from llmtrain.data.collate import SEQUENCE_LAYOUT_KEY
from llmtrain.data.files import data_changes
from llmtrain.errors import ConfigError, TrainingPreempted
from llmtrain.multimodal import MultimodalBase
from llmtrain.run.checkpoints import convert_to_universal, reporting_full_disk
from llmtrain.run.completeness import saved_world_size
from llmtrain.run.manifest import read_manifest, run_manifest, write_manifest
from llmtrain.run.output_dir import FINAL_STAGING_DIR, LOSS_CURVE_FILE, SUMMARY_FILE, RunStart, open_output_dir
from llmtrain.run.tracking import plot_loss_curve
from llmtrain.run.trainer import LlmTrainer, build_trainer

logger = logging.getLogger(__name__)


def train_in_output_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    run_config: dict[str, Any],
    start: RunStart,
    data: PreparedData,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    sequence_length: int,
    published: MultimodalBase | None = None,
) -> dict[str, Any]:
    """The tail both stages share: open ``output_dir``, record the manifest, build the Trainer, train and save.

    Called once the data and the model are built, so a bad input never leaves a half-initialised
    output dir behind. With ``published`` (the multimodal checkpoint ``model`` is the text model
    of) the final model is saved in that checkpoint's layout. Returns the summary written to
    ``train_summary.json``. A resume's data identity is checked here unless the data preparation
    already did (:func:`resume_data_check`, before it tokenized anything).
    """
    if start.resume_from is not None and not data.identity_checked:
        check_data_unchanged(start.resume_from, data, args)
    lock = open_output_dir(args, run_config, start)  # held by the main process until the run ends
    try:
        manifest = run_manifest(run_config, data.path, data.metadata, start.run_id)
        trainer = build_trainer(model, tokenizer, args, data.train, data.eval, data_collator, manifest, sequence_length)
        return train_and_save(trainer, start, manifest, published)
    finally:
        lock.release()


def resume_data_check(start: RunStart | None, args: TrainArguments, layout: str | None = None) -> CheckSources | None:
    """The data check a resumed run hands to its data preparation, which runs it before writing anything.

    None when this launch resumes nothing (or only prepares data). The returned function refuses
    sources that differ from the checkpoint's, as :func:`check_data_unchanged` does; ``layout`` is
    the SFT sequence layout's name this run will use (None for pretraining).
    """
    if start is None or start.resume_from is None:
        return None
    checkpoint = start.resume_from

    def check(sources: dict[str, Any]) -> None:
        _check_identity(checkpoint, sources, layout, args)

    return check


def check_data_unchanged(checkpoint: Path, data: PreparedData, args: TrainArguments) -> None:
    """Refuse to resume ``checkpoint`` on other training data than it was trained on, unless allowed.

    The data identity is the file list with sizes and content digests recorded in the checkpoint's
    manifest (``data.sources``). Resuming mid-epoch on changed data would continue a data order
    computed for other samples, without a word. With ``allow_data_change`` the changes are logged
    and the data order starts a fresh pass over the new data (the Trainer skips no batches).
    """
    recorded = data.metadata.get(SEQUENCE_LAYOUT_KEY) or {}
    _check_identity(checkpoint, data.metadata.get("sources", {}), recorded.get("chosen", recorded.get("name")), args)


def _check_identity(checkpoint: Path, sources: dict[str, Any], layout: str | None, args: TrainArguments) -> None:
    saved_data = read_manifest(checkpoint).get("data", {})
    saved = saved_data.get("sources")
    if not saved:
        return  # a checkpoint from before data identities were recorded
    changes = data_changes(saved, sources)
    recorded = saved_data.get(SEQUENCE_LAYOUT_KEY) or {}
    saved_layout = recorded.get("chosen", recorded.get("name"))
    if saved_layout != layout and saved_layout is not None:
        # Packed rows and per-conversation rows are other samples: the saved data order would continue
        # over a different set (llmtrain.data.collate: the layout depends on the machine's kernels).
        changes.append(f"the rows were laid out {saved_layout}, now {layout} (see the log's sequence layout line)")
    if not changes:
        return
    listed = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
    if not args.allow_data_change:
        raise ConfigError(
            f"train_files: the training data changed since {checkpoint} was written ({listed}). Restore the "
            "original files to resume, pass --start_over true to train from step 0, or --allow_data_change true "
            "to continue on the new data (its data order starts a fresh pass)"
        )
    logger.warning(
        "allow_data_change: resuming %s on changed data (%s); the data order starts a fresh pass over it",
        checkpoint,
        listed,
    )
    args.ignore_data_skip = True


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
    load_universal_checkpoint(trainer.accelerator.state.deepspeed_plugin)


def train_and_save(
    trainer: LlmTrainer, start: RunStart, manifest: dict[str, Any], published: MultimodalBase | None = None
) -> dict[str, Any]:
    """Train (resuming if ``start`` says so), save the final model, summary and loss curve.

    The final model gets ``published``'s layout where given (:meth:`MultimodalBase.publish`); the
    checkpoints keep the text model's, which resume loads. Returns the summary written to
    ``train_summary.json``.
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
    # Saved aside, then moved in: output_dir never holds a half-written final model. A staging dir
    # left by a run killed while saving is cleared first (its run resumed at its last checkpoint).
    staging = output_dir / FINAL_STAGING_DIR
    if args.should_save and staging.exists():
        shutil.rmtree(staging)
    with reporting_full_disk(staging):
        trainer.save_model(str(staging))
        if args.should_save and published is not None:
            published.publish(staging, trainer.model)
    if args.should_save:
        write_manifest(staging, manifest, trainer.state.global_step)
    trainer.faults.maybe_kill("kill_during_final_save", trainer.state.global_step)
    if args.should_save:
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
        # None when this launch only finished the final save of a run whose last checkpoint is at max_steps.
        "train_loss": result.training_loss if trainer.state.global_step > start.resumed_step else None,
        "skipped_nonfinite": guard.skipped_nonfinite,
        "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
        # [step, eval loss] of every evaluation (step 0 with eval_on_start: the model before training).
        "eval_losses": [
            [entry["step"], entry["eval_loss"]] for entry in trainer.state.log_history if "eval_loss" in entry
        ],
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
