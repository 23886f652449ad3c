"""The order of the checks for one stage, each fed what the earlier ones produced; bad input never raises here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtrain.config.arguments import (
    FinetuneArguments,
    ModelArguments,
    PretrainDataArguments,
    SFTDataArguments,
    TrainArguments,
)
from llmtrain.config.parser import parse_args
from llmtrain.modeling import load_model_config
from llmtrain.multimodal import text_training_config
from llmtrain.run.lock import LOCK_FILE, check_not_held
from llmtrain.stages import SFT, Stage, find_stage
from llmtrain.tools.doctor.data import check_data
from llmtrain.tools.doctor.environment import check_gpus, check_libraries
from llmtrain.tools.doctor.model import (
    check_length,
    check_token_mixers,
    check_tokenizer,
    count_parameters,
    resolve_model_sources,
)
from llmtrain.tools.doctor.report import OK, WARNING, Finding, Report
from llmtrain.tools.doctor.resources import bytes_per_weight, check_disk, check_writable, estimate_disk, tokenizer_bytes


def diagnose(stage_name: str, argv: Sequence[str], fast: bool) -> list[Finding]:
    """Run every check for the stage called ``stage_name`` (see :func:`llmtrain.stages.find_stage`).

    ``argv`` is what the stage's entry file would be given, read with the same dataclasses and
    default config. Bad input never raises: every problem is an ERROR finding (only an unknown
    ``stage_name`` raises :class:`~llmtrain.errors.ConfigError`).
    """
    report = Report()
    stage = find_stage(stage_name)
    check_libraries(report, fast)
    dataclass_types = stage.dataclass_types()
    parsed = report.attempt("config", lambda: parse_args(dataclass_types, argv, stage.default_config))
    if parsed is not None:
        source = argv[0] if argv and not argv[0].startswith("-") else stage.default_config
        report.add(OK, "config", f"{source} with {sum(arg.startswith('--') for arg in argv)} override(s) parses")
    report.attempt("gpus", lambda: check_gpus(report, parsed[-1] if parsed is not None else None))
    if parsed is not None:
        _check_run(report, stage, fast, parsed)
    return report.findings


def _check_run(report: Report, stage: Stage, fast: bool, parsed: tuple[Any, ...]) -> None:
    """The checks that need the parsed arguments: model, lengths, tokenizer, data, output dir, disk."""
    model_args: ModelArguments = parsed[0]
    data_args: PretrainDataArguments | SFTDataArguments = parsed[1]
    method_args: FinetuneArguments | None = parsed[2] if stage is SFT else None
    training_args: TrainArguments = parsed[-1]

    loadable = report.attempt("model", lambda: resolve_model_sources(report, model_args, fast))
    model_config = None
    counts = None
    if loadable is not None:
        model_config = report.attempt("model", lambda: text_training_config(load_model_config(loadable)))
    if model_config is not None:
        packing = data_args.packing if isinstance(data_args, SFTDataArguments) else None
        mixers = (model_config, model_args.attn_implementation, packing, training_args.use_cpu)
        report.attempt("token mixers", lambda: check_token_mixers(report, *mixers))
        counts = report.attempt("model", lambda: count_parameters(model_config, model_args, method_args))
        if counts is not None:
            method = f", {method_args.finetuning_type}" if method_args is not None else ""
            report.add(
                OK,
                "model",
                f"{model_config.model_type}: {counts.unique / 1e6:.2f} M parameters, "
                f"{counts.trainable / 1e6:.2f} M trainable{method} (counted on the meta device, no weights read)",
            )
        length = stage.sequence_length(data_args)
        report.attempt("sequence length", lambda: check_length(report, length, model_config, stage.length_field))
    tokenizer = None
    if loadable is not None:
        tokenizer = report.attempt(
            "tokenizer", lambda: check_tokenizer(report, stage, loadable, data_args, model_config)
        )
    else:
        report.add(WARNING, "tokenizer", "not checked: the model sources did not resolve")
    report.attempt("data", lambda: check_data(report, stage, data_args, tokenizer, fast))

    if not (data_args.tokenized_path and Path(data_args.tokenized_path).exists()):
        cache_field = "tokenized_path" if data_args.tokenized_path else "dataset_cache_dir"
        cache = Path(data_args.tokenized_path or data_args.dataset_cache_dir)
        report.attempt(cache_field, lambda: check_writable(report, cache, cache_field))
    if data_args.prepare_only:
        report.add(OK, "output_dir", "not checked: prepare_only writes only the tokenized dataset")
        return
    output_dir = Path(str(training_args.output_dir))
    report.attempt("output_dir", lambda: check_writable(report, output_dir, "output_dir"))
    # A live launch in this output_dir: refused here, before the entry point's own ~4 s of imports.
    report.attempt("output_dir", lambda: check_not_held(output_dir / LOCK_FILE))
    if counts is None or model_config is None or loadable is None:
        report.add(WARNING, "disk", "not estimated: the model config did not load")
        return
    weight_bytes = bytes_per_weight(model_args, model_config)
    estimate = estimate_disk(counts, weight_bytes, training_args, tokenizer_bytes(loadable.tokenizer_name_or_path))
    report.attempt("disk", lambda: check_disk(report, training_args, estimate))
