"""The data checks: every file resolves and its first record parses as the stage reads it; one sample encoded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import PretrainDataArguments, SFTDataArguments
from llmtrain.data.cache import META_FILE
from llmtrain.data.chat_masks import encode_conversation
from llmtrain.data.conversations import CONVERSATION_FILES, Message, detect_format, normalise_record
from llmtrain.data.documents import data_suffix, iter_documents, record_text
from llmtrain.data.files import resolve_data_files
from llmtrain.data.fitting import drop_trailing_user_turns
from llmtrain.data.records import first_json_record, is_json_array
from llmtrain.errors import DataError, InvalidRecord, UserInputError
from llmtrain.loss import IGNORE_INDEX
from llmtrain.stages import SFT, Stage
from llmtrain.tools.doctor.report import ERROR, OK, WARNING, Report, describe

FIRST_RECORD_MAX_BYTES = 16 << 20  # a first record longer than this is not parsed (fast mode stays fast)
MAX_ERRORS_PER_CHECK = 10  # a directory of broken files should not print thousands of lines


def first_record(
    path: Path, stage: Stage, data_args: PretrainDataArguments | SFTDataArguments
) -> tuple[str, Any] | None:
    """Read and check the first record of a data file the way the stage's reader sees it.

    Returns ``(where, document text)`` for pretraining, ``(where, messages)`` for SFT, or None when
    the first record is too long to read cheaply. Raises :class:`DataError` naming the file (and
    line) when the file is unreadable, empty, or its first record is malformed.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if stage is SFT:
        assert isinstance(data_args, SFTDataArguments)
        if not CONVERSATION_FILES.format_of(path):
            raise DataError(f"{path}: unsupported conversation file type; use {CONVERSATION_FILES.names()}")
        found = first_json_record(path, FIRST_RECORD_MAX_BYTES)
        if found is None:
            return None
        where, record = found
        messages: list[Message] = normalise_record(
            record, detect_format(record, where), where, data_args.default_system_prompt
        )
        return where, messages
    assert isinstance(data_args, PretrainDataArguments)
    if data_suffix(path) == ".json" and is_json_array(path):
        found = first_json_record(path, FIRST_RECORD_MAX_BYTES)  # an array is parsed whole: read only its head
        if found is None:
            return None
        where, record = found
        return where, record_text(record, data_args.text_field, where)
    # Everything else streams, so the first document costs one line (one record batch of a parquet file).
    return next(iter_documents(path, data_args.text_field, data_args.txt_sample_by))


def check_data(
    report: Report,
    stage: Stage,
    data_args: PretrainDataArguments | SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase | None,
    fast: bool,
) -> None:
    """Each data file resolves, is readable and starts with a valid record; without ``fast``, one sample is encoded."""
    if data_args.tokenized_path and Path(data_args.tokenized_path).exists():
        if not (Path(data_args.tokenized_path) / META_FILE).is_file():
            raise DataError(
                f"tokenized_path: {data_args.tokenized_path} exists but is not a dataset prepared by llmtrain"
            )
        report.add(OK, "data", f"tokenized_path {data_args.tokenized_path} exists: used as is, raw files not read")
        return
    sample: tuple[str, Any] | None = None
    for field_name in ("train_files", "validation_files"):
        specs = getattr(data_args, field_name)
        if not specs:
            continue
        paths = resolve_data_files(specs, field_name, stage.name)
        problems: list[str] = []
        unchecked: list[str] = []
        skips = isinstance(data_args, SFTDataArguments) and data_args.invalid_records == "skip"
        for path in paths:
            try:
                found = first_record(path, stage, data_args)
            except InvalidRecord as invalid:
                if not skips:
                    problems.append(describe(invalid))
                    continue
                report.add(WARNING, "data", f"{describe(invalid)} (invalid_records: skip leaves it out)")
                continue
            except (UserInputError, OSError) as error:
                problems.append(describe(error))
                continue
            if found is None:
                unchecked.append(str(path))
            elif sample is None and field_name == "train_files":
                sample = found
        for problem in problems[:MAX_ERRORS_PER_CHECK]:
            report.add(ERROR, "data", problem)
        if len(problems) > MAX_ERRORS_PER_CHECK:
            report.add(ERROR, "data", f"{field_name}: {len(problems) - MAX_ERRORS_PER_CHECK} more bad file(s)")
        if unchecked:
            cap = FIRST_RECORD_MAX_BYTES >> 20
            report.add(WARNING, "data", f"{field_name}: first record beyond {cap} MiB, not parsed: {unchecked[0]} ...")
        if not problems:
            report.add(OK, "data", f"{field_name}: {len(paths)} file(s) readable, first records parse")
    if fast or sample is None:
        return
    if tokenizer is None:
        report.add(WARNING, "data sample", "not encoded: the tokenizer did not load")
        return
    report.attempt("data sample", lambda: _encode_sample(report, stage, data_args, tokenizer, *sample))


def _encode_sample(
    report: Report,
    stage: Stage,
    data_args: PretrainDataArguments | SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    content: Any,
) -> None:
    """Encode the first training record as training will; report its token (and supervised-token) counts."""
    if stage is not SFT:
        ids = tokenizer(content, add_special_tokens=False, verbose=False)["input_ids"]
        status = OK if content.strip() else WARNING
        report.add(status, "data sample", f"{where}: {len(ids)} tokens + EOS ({len(content)} characters)")
        return
    assert isinstance(data_args, SFTDataArguments)
    answered, _ = drop_trailing_user_turns(content)
    rows = encode_conversation(
        answered,
        tokenizer,
        data_args.end_of_turn_token,
        data_args.train_on_last_turn_only,
        where,
        data_args.template_kwargs,
    )
    tokens = max(len(row["input_ids"]) for row in rows)
    supervised = sum(label != IGNORE_INDEX for row in rows for label in row["labels"])
    in_rows = f" in {len(rows)} rows (the template renders history differently)" if len(rows) > 1 else ""
    message = f"{where}: {len(content)} messages, {tokens} tokens{in_rows}, {supervised} supervised"
    if supervised == 0:
        report.add(WARNING, "data sample", f"{message}: no assistant token is supervised")
    elif tokens > data_args.max_seq_length:
        report.add(
            WARNING,
            "data sample",
            f"{message}: longer than max_seq_length={data_args.max_seq_length} "
            f"(truncation_strategy: {data_args.truncation_strategy})",
        )
    else:
        report.add(OK, "data sample", message)
