"""The resource checks: output dir and dataset cache writable, free disk against an estimate of the kept checkpoints."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from llmtrain.config.arguments import ModelArguments, TrainArguments
from llmtrain.paths import nearest_existing, writable_problem
from llmtrain.tools.doctor.model import ParameterCounts
from llmtrain.tools.doctor.report import OK, WARNING, PreflightError, Report

# Checkpoint size model, calibrated on the tiny default (2026-11, DeepSpeed ZeRO-2, fp32, 1.51 M
# parameters): model.safetensors 8.14 MB (tied lm_head written again), global_step*/
# mp_rank_00_model_states.pt 6.05 MB (weights once more), zero_pp_rank_*_optim_states.pt 18.12 MB
# (12 bytes per trainable parameter); the estimate below gives 32.3 MB + tokenizer for 32.7 MB.
FP32_BYTES = 4
DEEPSPEED_OPTIMIZER_BYTES = 12  # fp32 master copy + Adam's two fp32 moments, per trainable parameter
SMALL_FILES_BYTES = 256 << 10  # trainer_state.json, RNG and scheduler state, DeepSpeed's scripts
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json")


def check_writable(report: Report, path: Path, field_name: str) -> None:
    """Files can be written at ``path``: a probe is created and deleted there, or in its nearest existing parent.

    Raises :class:`PreflightError` as ``"{field_name}: {problem}"`` with the run's own wording
    (:func:`llmtrain.paths.writable_problem`); nothing is created or left behind.
    """
    problem = writable_problem(path)
    if problem is not None:
        raise PreflightError(f"{field_name}: {problem}")
    target = nearest_existing(path)
    where = "exists" if target == path.expanduser().absolute() else f"will be created under {target}"
    report.add(OK, field_name, f"{path} {where}: writable")


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a run keeps on disk at its peak: checkpoints plus the final model."""

    per_checkpoint: int
    checkpoints: int
    final_model: int
    explanation: str

    @property
    def total(self) -> int:
        return self.per_checkpoint * self.checkpoints + self.final_model


def tokenizer_bytes(tokenizer_name_or_path: str | None) -> int:
    """Size of the tokenizer files saved with every checkpoint (0 when not a local directory)."""
    if tokenizer_name_or_path is None or not Path(tokenizer_name_or_path).is_dir():
        return 0
    files = [
        path
        for path in Path(tokenizer_name_or_path).iterdir()
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in TOKENIZER_FILES)
    ]
    return sum(path.stat().st_size for path in files)


def bytes_per_weight(model_args: ModelArguments, model_config: PretrainedConfig) -> int:
    """Bytes per weight in the training dtype (``auto``: the checkpoint's, fp32 when unstated)."""
    if model_args.dtype != "auto":
        return DTYPE_BYTES[model_args.dtype]
    stated = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return DTYPE_BYTES.get(str(stated).removeprefix("torch."), FP32_BYTES)


def estimate_disk(
    counts: ParameterCounts, weight_bytes: int, training_args: TrainArguments, extra_bytes: int = 0
) -> DiskEstimate:
    """Estimate checkpoint and final-model sizes from parameter counts (see the calibration note above).

    A checkpoint holds the weights (the adapter for LoRA, kept in fp32 by peft), under DeepSpeed
    a second copy of them in its model states (plus the tied embedding for LoRA), and the optimizer
    state: 12 bytes per trainable parameter under DeepSpeed (fp32 master + two Adam moments), two
    moments in the parameter dtype with torch's AdamW. ``save_total_limit`` checkpoints are kept,
    plus the one being written (the newest complete one is deleted only after it completes).
    ``extra_bytes`` (tokenizer files) is added to each save.
    """
    deepspeed = bool(training_args.deepspeed)
    if counts.adapter_only:
        weights = counts.trainable * FP32_BYTES
        deepspeed_copy = weights + counts.tied * weight_bytes if deepspeed else 0
        moment_bytes = FP32_BYTES
    else:
        weights = counts.saved * weight_bytes
        deepspeed_copy = counts.unique * weight_bytes if deepspeed else 0
        moment_bytes = weight_bytes
    per_parameter = DEEPSPEED_OPTIMIZER_BYTES if deepspeed else 2 * moment_bytes
    optimizer = 0 if training_args.save_only_model else counts.trainable * per_parameter
    per_checkpoint = weights + deepspeed_copy + optimizer + extra_bytes + SMALL_FILES_BYTES
    limit = training_args.checkpoint_limit  # the user's save_total_limit (TrainArguments holds it)
    note = ""
    if training_args.save_strategy == "no":
        kept = 0
    elif limit:
        kept = limit + 1
    elif training_args.save_strategy == "steps" and training_args.max_steps > 0:
        steps = training_args.save_steps
        kept = math.ceil(1 / steps) if steps < 1 else math.ceil(training_args.max_steps / steps)
    else:
        kept, note = 1, "; save_total_limit unset: checkpoints are never deleted, only one is counted"
    parts = [f"weights {human_bytes(weights)}"]
    if deepspeed_copy:
        parts.append(f"DeepSpeed model states {human_bytes(deepspeed_copy)}")
    if optimizer:
        parts.append(f"optimizer state {human_bytes(optimizer)}")
    what = "adapter" if counts.adapter_only else "model"
    explanation = (
        f"{kept} checkpoint(s) x {human_bytes(per_checkpoint)} ({' + '.join(parts)}) + final {what} "
        f"{human_bytes(weights + extra_bytes)}{note}"
    )
    return DiskEstimate(per_checkpoint, kept, weights + extra_bytes, explanation)


def human_bytes(count: float) -> str:
    """Decimal units, as ``df -H`` prints them.

    >>> human_bytes(32_661_148), human_bytes(512), human_bytes(3.2e12)
    ('32.7 MB', '512 B', '3.2 TB')
    """
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _bytes_under(paths: Iterator[Path]) -> int:
    return sum(path.stat().st_size for directory in paths for path in directory.rglob("*") if path.is_file())


def check_disk(report: Report, training_args: TrainArguments, estimate: DiskEstimate) -> None:
    """Free space at ``output_dir`` against the estimate, less what its checkpoints already hold."""
    output_dir = Path(str(training_args.output_dir))
    target = nearest_existing(output_dir)
    free = shutil.disk_usage(target).free
    held = _bytes_under(output_dir.glob("checkpoint-*")) if output_dir.is_dir() else 0
    needed = max(estimate.total - held, 0)
    already = f", {human_bytes(held)} of it already in checkpoints there" if held else ""
    message = f"{human_bytes(free)} free at {target}; the run needs ~{human_bytes(estimate.total)}{already}: "
    message += estimate.explanation
    if free < needed:
        raise PreflightError(f"output_dir: {message}")
    report.add(WARNING if free < 2 * needed else OK, "disk", message)
