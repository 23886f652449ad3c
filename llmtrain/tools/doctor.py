"""Preflight checks for a training launch: one line per check, exit 2 when any check fails.

    python -m llmtrain.tools.doctor pretrain [config.yaml] [--key value ...] [--fast]
    python -m llmtrain.tools.doctor sft [config.yaml] [--key value ...] [--fast]

The stage is ``pretrain`` or ``sft`` (``finetune`` is accepted for ``sft``, so a launcher can pass
its entry file's name). The config file and overrides are exactly those of ``pretrain.py`` /
``finetune.py``, with the same default config. Checks, each reported as ``ok``, ``WARNING`` or
``ERROR`` on a greppable line (``doctor: ERROR   data: /d/x.jsonl:3: invalid JSON ...``):

* ``library <name>``: importable (``--fast``: installed), version against ``requirements.txt``'s pin;
* ``config``: the config and overrides parse (unknown keys, cross-field rules);
* ``gpus``: GPUs torch sees against what the launcher will use (``NUM_GPUS``,
  ``CUDA_VISIBLE_DEVICES``, ``NPROC``), bf16 on CPU;
* ``model``: the model config loads; parameters counted on the meta device (no weights read,
  nothing allocated), with the fine-tuning method applied for SFT;
* ``sequence length``: ``block_size`` / ``max_seq_length`` within the model's positions;
* ``tokenizer``: loads; EOS for pretraining; chat template and a single-token end of turn for SFT;
* ``data``: every train/validation file resolves, is readable and its first record parses; without
  ``--fast`` one sample is also encoded (token and supervised-token counts);
* ``output_dir`` (and the dataset cache): a probe file can be created and deleted there (or in its
  nearest existing parent; nothing is created or left behind);
* ``disk``: free space at ``output_dir`` against an estimate of the checkpoints the run keeps.

``--fast`` (what the launchers run before every start) reads no weights, makes no network request
and reads only the first record of each data file. Measured on 2 CPU cores: ~8 s of imports, then
0.1 s for the tiny default and ~2 s for a Qwen2.5-1.5B LoRA config (peft wraps the meta model).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from llmtrain.arguments import (
    DataArguments,
    FinetuneArguments,
    ModelArguments,
    SFTDataArguments,
    TrainArguments,
    parse_args,
)
from llmtrain.data.cache import META_FILE
from llmtrain.data.conversations import SUFFIXES as CONVERSATION_SUFFIXES
from llmtrain.data.conversations import UTF8_BOM, Message, detect_format, normalise_record
from llmtrain.data.files import resolve_data_files
from llmtrain.data.sft import IGNORE_INDEX, check_chat_tokenizer, encode_conversation
from llmtrain.errors import DataError, UserInputError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.modeling import check_sequence_length, load_model_config, load_tokenizer
from llmtrain.training import run_cli

logger = logging.getLogger(__name__)

T = TypeVar("T")

OK, WARNING, ERROR = "ok", "WARNING", "ERROR"
REPO_ROOT = Path(__file__).resolve().parents[2]  # a checkout: configs/ and requirements.txt live here
REQUIREMENTS_FILE = REPO_ROOT / "requirements.txt"
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
FAST_FLAG = "--fast"
STAGE_ALIASES = {"pretrain": "pretrain", "sft": "sft", "finetune": "sft"}
FIRST_RECORD_MAX_BYTES = 16 << 20  # a first record longer than this is not parsed (fast mode stays fast)
MAX_ERRORS_PER_CHECK = 10  # a directory of broken files should not print thousands of lines

# Checkpoint size model, calibrated on the tiny default (2026-11, DeepSpeed ZeRO-2, fp32, 1.51 M
# parameters): model.safetensors 8.14 MB (tied lm_head written again), global_step*/
# mp_rank_00_model_states.pt 6.05 MB (weights once more), zero_pp_rank_*_optim_states.pt 18.12 MB
# (12 bytes per trainable parameter); the estimate below gives 32.3 MB + tokenizer for 32.7 MB.
FP32_BYTES = 4
DEEPSPEED_OPTIMIZER_BYTES = 12  # fp32 master copy + Adam's two fp32 moments, per trainable parameter
SMALL_FILES_BYTES = 256 << 10  # trainer_state.json, RNG and scheduler state, DeepSpeed's scripts
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Fields naming a model source, with the file whose presence in the hub cache makes it usable offline.
MODEL_SOURCE_FIELDS = (
    ("config_name", "config.json"),
    ("model_name_or_path", "config.json"),
    ("tokenizer_name_or_path", "tokenizer_config.json"),
)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json")


class PreflightError(UserInputError):
    """The environment cannot run the configured training (a library, GPU, disk or permission problem)."""


@dataclass(frozen=True)
class Finding:
    """One reported line: a check's status and what it found."""

    status: str
    check: str
    message: str

    def line(self) -> str:
        """The report line, e.g. ``doctor: ERROR   output_dir: ...`` (always a single line)."""
        return f"doctor: {self.status:<7} {self.check}: {' '.join(self.message.split())}"


def describe(error: UserInputError | OSError) -> str:
    """The one-line message of a user error, or of a filesystem error with its path."""
    if isinstance(error, OSError) and not isinstance(error, UserInputError):
        return f"{error.filename}: {error.strerror or error}" if error.filename else str(error.strerror or error)
    return str(error)


class Report:
    """Collects findings; :meth:`attempt` turns a check's exception into an ERROR line."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, status: str, check: str, message: str) -> None:
        self.findings.append(Finding(status, check, message))

    def attempt(self, check: str, action: Callable[[], T]) -> T | None:
        """``action()``, or None after recording an ERROR for ``check`` if it raised."""
        try:
            return action()
        except (UserInputError, OSError) as error:
            self.add(ERROR, check, describe(error))
        except Exception as error:  # a doctor must report every failure, not stop at the first traceback
            logger.debug("check %s failed", check, exc_info=True)
            self.add(ERROR, check, f"unexpected {type(error).__name__}: {error}")
        return None

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == ERROR]


@dataclass(frozen=True)
class Stage:
    """What the stage's entry file parses, and which length field must fit the model."""

    dataclass_types: tuple[type, ...]
    default_config: Path
    length_field: str


STAGES = {
    "pretrain": Stage(
        (ModelArguments, DataArguments, TrainArguments), REPO_ROOT / "configs" / "pretrain_tiny.yaml", "block_size"
    ),
    "sft": Stage(
        (ModelArguments, SFTDataArguments, FinetuneArguments, TrainArguments),
        REPO_ROOT / "configs" / "sft_tiny_lora.yaml",
        "max_seq_length",
    ),
}


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
    """Equal versions, ignoring a local label such as torch's ``+cpu`` / ``+cu124``."""
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


def _whole_number(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise PreflightError(f"{name}={value!r} must be a whole number")
    return number


def check_gpus(report: Report, training_args: TrainArguments | None) -> None:
    """What scripts/launch.sh will start, from the same environment variables, against what torch sees.

    The launcher takes ``NUM_GPUS``, else the devices ``CUDA_VISIBLE_DEVICES`` lists, else every
    GPU; with none it runs ``NPROC`` CPU ranks (default 1) on gloo with ``--use_cpu``.
    """
    visible = torch.cuda.device_count()
    if os.environ.get("NUM_GPUS"):
        gpus = _whole_number("NUM_GPUS", os.environ["NUM_GPUS"])
        if gpus > visible:
            raise PreflightError(f"NUM_GPUS={gpus} but torch sees {visible} GPU(s) on this node")
        source = f"NUM_GPUS={gpus}"
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        listed = os.environ["CUDA_VISIBLE_DEVICES"]
        gpus = len([part for part in listed.split(",") if part.strip()])
        if gpus > visible:
            raise PreflightError(f"CUDA_VISIBLE_DEVICES={listed!r} lists {gpus} GPU(s) but torch sees {visible}")
        source = f"CUDA_VISIBLE_DEVICES={listed}"
    else:
        gpus, source = visible, f"torch sees {visible}"
    nodes = " (HOSTFILE set: other nodes are not checked)" if os.environ.get("HOSTFILE") else ""
    if gpus > 0:
        names = sorted({torch.cuda.get_device_name(index) for index in range(gpus)})
        report.add(OK, "gpus", f"{gpus} GPU rank(s) of {visible} visible ({source}; {', '.join(names)}){nodes}")
        if training_args is not None and training_args.use_cpu:
            report.add(WARNING, "gpus", "use_cpu is set: training will ignore the GPUs")
        return
    ranks = _whole_number("NPROC", os.environ.get("NPROC", "1"))
    if ranks < 1:
        raise PreflightError("NPROC must be at least 1")
    report.add(OK, "gpus", f"no GPU ({source}): CPU: {ranks} rank(s) on gloo, --use_cpu{nodes}")
    if training_args is not None and training_args.bf16:
        report.add(WARNING, "gpus", "bf16 is requested on CPU: it works but is ~3x slower than fp32 (--bf16 false)")


# --- model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the configured model, taken on the meta device (no memory, no weights)."""

    unique: int  # distinct parameters of the base model (tied weights once)
    saved: int  # state-dict entries: a tied lm_head counted again, as the DeepSpeed save writes it
    trainable: int  # what the optimizer holds: everything, the LoRA adapter, or the unfrozen layers
    adapter_only: bool  # LoRA: checkpoints and the final save hold the adapter, not the base

    @property
    def tied(self) -> int:
        """Parameters shared by the input embedding and the output head (0 when untied)."""
        return self.saved - self.unique


def count_parameters(
    model_config: PretrainedConfig, model_args: ModelArguments, method_args: FinetuneArguments | None = None
) -> ParameterCounts:
    """Build the model on the meta device and count; for SFT the fine-tuning method is applied too.

    Raises the fine-tuning method's :class:`~llmtrain.errors.ConfigError` (a LoRA target that
    matches nothing, more trainable layers than the model has).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(model_config), trust_remote_code=model_args.trust_remote_code
        )
    unique = sum(parameter.numel() for parameter in model.parameters())
    saved = sum(parameter.numel() for _, parameter in model.named_parameters(remove_duplicate=False))
    adapter_only = method_args is not None and method_args.finetuning_type == "lora"
    if method_args is not None:
        model = apply_finetuning_method(model, method_args, activation_checkpointing=False)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return ParameterCounts(unique=unique, saved=saved, trainable=trainable, adapter_only=adapter_only)


def local_source(source: str, filename: str) -> Path | None:
    """``source`` itself when it exists locally, else its snapshot dir in the hub cache, else None.

    Lets ``--fast`` load a cached hub model without a network round trip (an uncached hub id with
    no network costs ~25 s of retries).
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, filename)
    except ValueError:  # HFValidationError: not a hub id (a relative path such as ../x)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_model_sources(report: Report, model_args: ModelArguments, fast: bool) -> ModelArguments | None:
    """``model_args`` with each source replaced by a local directory (the hub cache's snapshot for a hub id).

    A missing local path (or any uncached source with ``HF_HUB_OFFLINE``) is an error, found without
    a network round trip (an uncached hub id with no network costs ~25 s of retries). An uncached
    hub id is left for the loaders to download, except with ``fast``: then it is a warning and None
    is returned, since ``--fast`` makes no network request.
    """
    from huggingface_hub import constants

    replacements: dict[str, Any] = {}
    for field_name, filename in MODEL_SOURCE_FIELDS:
        source = getattr(model_args, field_name)
        if source is None:
            continue
        local = local_source(source, filename)
        if local is not None:
            replacements[field_name] = str(local)
            continue
        if source.startswith((".", "/", "~")) or Path(Path(source).parts[0]).is_dir():
            hint = " (run bash pretrain.sh first: it writes it)" if source.rstrip("/").endswith("pretrain-tiny") else ""
            raise PreflightError(f"{field_name}: {source} does not exist{hint}")
        if constants.HF_HUB_OFFLINE:
            raise PreflightError(f"{field_name}: {source} is not in the hub cache and HF_HUB_OFFLINE is set")
        if fast:
            report.add(
                WARNING,
                "model",
                f"{field_name}: {source} is not in the hub cache; training would download it (not checked in --fast)",
            )
            return None
    return dataclasses.replace(model_args, **replacements)


def check_length(report: Report, length: int, model_config: PretrainedConfig, field_name: str) -> None:
    """``field_name``'s sequence length within the model's position range."""
    check_sequence_length(length, model_config, field_name)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None:
        report.add(WARNING, "sequence length", f"{field_name}={length}: the model config states no position limit")
    else:
        report.add(OK, "sequence length", f"{field_name}={length} <= max_position_embeddings={limit}")


# --- tokenizer --------------------------------------------------------------------------------


def check_tokenizer(
    report: Report,
    stage: str,
    model_args: ModelArguments,
    data_args: DataArguments | SFTDataArguments,
    model_config: PretrainedConfig | None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and check what the stage needs from it; errors name the field."""
    tokenizer = load_tokenizer(model_args)
    details = [f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"]
    if stage == "sft":
        assert isinstance(data_args, SFTDataArguments)
        end_of_turn_id = check_chat_tokenizer(tokenizer, data_args.end_of_turn_token)
        details.append(f"chat template present, end of turn {data_args.end_of_turn_token!r} = id {end_of_turn_id}")
        if not data_args.packing and tokenizer.pad_token_id is None:
            raise DataError("tokenizer_name_or_path: the tokenizer has no pad token, needed with packing: false")
    else:
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer_name_or_path: the tokenizer has no EOS token; pretraining needs one")
        details.append(f"EOS {tokenizer.eos_token!r} = id {tokenizer.eos_token_id}")
    if model_config is not None and len(tokenizer) > model_config.vocab_size:
        if model_args.from_scratch:
            raise DataError(
                f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but config_name's "
                f"vocab_size is {model_config.vocab_size}"
            )
        report.add(
            WARNING,
            "tokenizer",
            f"{len(tokenizer)} tokens > vocab_size {model_config.vocab_size}: embeddings will be resized",
        )
    report.add(OK, "tokenizer", f"{model_args.tokenizer_name_or_path}: {'; '.join(details)}")
    return tokenizer


# --- data -------------------------------------------------------------------------------------


def _first_line_record(path: Path, strip_bom: bool) -> tuple[str, object] | None:
    """``("path:line", record)`` of the first non-blank JSON line; None when it lies beyond the read cap."""
    read = 0
    with path.open("rb") as stream:
        for number, raw_line in enumerate(iter(lambda: stream.readline(FIRST_RECORD_MAX_BYTES), b""), start=1):
            read += len(raw_line)
            if read > FIRST_RECORD_MAX_BYTES or (len(raw_line) == FIRST_RECORD_MAX_BYTES and raw_line[-1:] != b"\n"):
                return None
            if number == 1 and strip_bom:
                raw_line = raw_line.removeprefix(UTF8_BOM)
            where = f"{path}:{number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{where}: not valid UTF-8 ({error.reason} at byte {error.start} of the line)"
                ) from error
            if not line.strip():
                continue
            try:
                return where, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg}, column {error.colno})") from error
    raise DataError(f"{path}: the file holds no records")


def _first_array_record(path: Path) -> tuple[str, object] | None:
    """``("path: record 1", record)`` of a ``.json`` array, parsed from its first bytes only."""
    with path.open("rb") as stream:
        head = stream.read(FIRST_RECORD_MAX_BYTES)
    complete = len(head) < FIRST_RECORD_MAX_BYTES
    try:  # a cut-off read may end inside a multi-byte character
        text = head.removeprefix(UTF8_BOM).decode("utf-8", errors="strict" if complete else "ignore")
    except UnicodeDecodeError as error:
        line = head.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from error
    body = text.lstrip()[1:].lstrip()  # after the opening "["
    if body.startswith("]"):
        raise DataError(f"{path}: the file holds no records")
    try:
        record, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as error:
        if not complete:
            return None
        line = text[: len(text) - len(body) + error.pos].count("\n") + 1
        raise DataError(f"{path}:{line}: invalid JSON ({error.msg})") from error
    return f"{path}: record 1", record


def first_record(path: Path, stage: str, data_args: DataArguments | SFTDataArguments) -> tuple[str, Any] | None:
    """Read and check the first record of a data file the way the stage's reader sees it.

    Returns ``(where, document text)`` for pretraining, ``(where, messages)`` for SFT, or None when
    the first record is too long to read cheaply. Raises :class:`DataError` naming the file (and
    line) when the file is unreadable, empty, or its first record is malformed.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if stage == "sft":
        assert isinstance(data_args, SFTDataArguments)
        if path.suffix not in CONVERSATION_SUFFIXES:
            raise DataError(f"{path}: unsupported conversation file type; use {' or '.join(CONVERSATION_SUFFIXES)}")
        found = _read_json_record(path, strip_bom=True)
        if found is None:
            return None
        where, record = found
        messages: list[Message] = normalise_record(
            record, detect_format(record, where), where, data_args.default_system_prompt
        )
        return where, messages
    assert isinstance(data_args, DataArguments)
    if path.suffix == ".parquet":
        return _first_parquet_text(path, data_args.text_field)
    if path.suffix == ".txt":
        with path.open("rb") as stream:
            head = stream.readline(FIRST_RECORD_MAX_BYTES)
        try:
            return f"{path}:1", head.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:1: not valid UTF-8 ({error.reason} at byte {error.start})") from error
    found = _read_json_record(path, strip_bom=False)
    if found is None:
        return None
    where, record = found
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get(data_args.text_field)
    if not isinstance(text, str):
        problem = "missing" if text is None else f"a {type(text).__name__}, not a string"
        raise DataError(f"{where}: field '{data_args.text_field}' is {problem} (fields: {', '.join(record) or 'none'})")
    return where, text


def _read_json_record(path: Path, strip_bom: bool) -> tuple[str, object] | None:
    with path.open("rb") as stream:
        start = stream.read(64).removeprefix(UTF8_BOM).lstrip()
    if path.suffix == ".json" and start[:1] == b"[":
        return _first_array_record(path)
    return _first_line_record(path, strip_bom)


def _first_parquet_text(path: Path, text_field: str) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as parquet: {error}") from error
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no field '{text_field}' (fields: {', '.join(schema.names) or 'none'})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: field '{text_field}' holds {column_type}, not text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: the file holds no records")
    batch = next(parquet.iter_batches(batch_size=1, columns=[text_field]))
    return f"{path}: row 1", str(batch.column(0)[0].as_py() or "")


def check_data(
    report: Report,
    stage: str,
    data_args: DataArguments | SFTDataArguments,
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
        paths = resolve_data_files(specs, field_name)
        problems: list[str] = []
        unchecked: list[str] = []
        for path in paths:
            try:
                found = first_record(path, stage, data_args)
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
    stage: str,
    data_args: DataArguments | SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    content: Any,
) -> None:
    if stage == "pretrain":
        ids = tokenizer(content, add_special_tokens=False, verbose=False)["input_ids"]
        status = OK if content.strip() else WARNING
        report.add(status, "data sample", f"{where}: {len(ids)} tokens + EOS ({len(content)} characters)")
        return
    assert isinstance(data_args, SFTDataArguments)
    encoded = encode_conversation(content, tokenizer, data_args.end_of_turn_token, data_args.train_on_last_turn_only)
    tokens = len(encoded["input_ids"])
    supervised = sum(label != IGNORE_INDEX for label in encoded["labels"])
    message = f"{where}: {len(content)} messages, {tokens} tokens, {supervised} supervised"
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


# --- output dir and disk ----------------------------------------------------------------------


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(report: Report, path: Path, field_name: str) -> None:
    """Create and delete a probe file in ``path``, or in its nearest existing parent when ``path`` is missing."""
    target = nearest_existing(path)
    if not target.is_dir():
        raise PreflightError(f"{field_name}: {target} is not a directory, so {path} cannot be created there")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".llmtrain-doctor-", dir=target)
    except OSError as error:
        raise PreflightError(f"{field_name}: cannot write in {target} ({error.strerror or error})") from error
    os.close(descriptor)
    os.unlink(probe)
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
    limit = training_args.save_total_limit
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


# --- the run ----------------------------------------------------------------------------------


def _weight_bytes(model_args: ModelArguments, model_config: PretrainedConfig) -> int:
    """Bytes per weight in the training dtype (``auto``: the checkpoint's, fp32 when unstated)."""
    if model_args.dtype != "auto":
        return DTYPE_BYTES[model_args.dtype]
    stated = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return DTYPE_BYTES.get(str(stated).removeprefix("torch."), FP32_BYTES)


def diagnose(stage: str, argv: Sequence[str], fast: bool) -> list[Finding]:
    """Run every check for ``stage`` with the entry file's arguments; bad input never raises."""
    report = Report()
    spec = STAGES[stage]
    check_libraries(report, fast)
    parsed = report.attempt("config", lambda: parse_args(spec.dataclass_types, argv, spec.default_config))
    if parsed is not None:
        source = argv[0] if argv and not argv[0].startswith("-") else spec.default_config
        report.add(OK, "config", f"{source} with {sum(arg.startswith('--') for arg in argv)} override(s) parses")
    report.attempt("gpus", lambda: check_gpus(report, parsed[-1] if parsed is not None else None))
    if parsed is not None:
        _check_run(report, stage, fast, parsed)
    return report.findings


def _check_run(report: Report, stage: str, fast: bool, parsed: tuple[Any, ...]) -> None:
    """The checks that need the parsed arguments: model, lengths, tokenizer, data, output dir, disk."""
    spec = STAGES[stage]
    model_args: ModelArguments = parsed[0]
    data_args: DataArguments | SFTDataArguments = parsed[1]
    method_args: FinetuneArguments | None = parsed[2] if stage == "sft" else None
    training_args: TrainArguments = parsed[-1]

    loadable = report.attempt("model", lambda: resolve_model_sources(report, model_args, fast))
    model_config = None
    counts = None
    if loadable is not None:
        model_config = report.attempt("model", lambda: load_model_config(loadable))
    if model_config is not None:
        counts = report.attempt("model", lambda: count_parameters(model_config, model_args, method_args))
        if counts is not None:
            method = f", {method_args.finetuning_type}" if method_args is not None else ""
            report.add(
                OK,
                "model",
                f"{model_config.model_type}: {counts.unique / 1e6:.2f} M parameters, "
                f"{counts.trainable / 1e6:.2f} M trainable{method} (counted on the meta device, no weights read)",
            )
        length = getattr(data_args, spec.length_field)
        report.attempt("sequence length", lambda: check_length(report, length, model_config, spec.length_field))
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
    if counts is None or model_config is None or loadable is None:
        report.add(WARNING, "disk", "not estimated: the model config did not load")
        return
    weight_bytes = _weight_bytes(model_args, model_config)
    estimate = estimate_disk(counts, weight_bytes, training_args, tokenizer_bytes(loadable.tokenizer_name_or_path))
    report.attempt("disk", lambda: check_disk(report, training_args, estimate))


def write_report(findings: Sequence[Finding], stream: TextIO, fast: bool) -> None:
    """Every finding's line, then a one-line summary."""
    for finding in findings:
        stream.write(finding.line() + "\n")
    errors = sum(finding.status == ERROR for finding in findings)
    warnings = sum(finding.status == WARNING for finding in findings)
    stream.write(f"doctor: {errors} error(s), {warnings} warning(s){' (--fast)' if fast else ''}\n")
    stream.flush()


def split_cli(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """``STAGE [config.yaml] [--key value ...] [--fast]`` -> (stage, fast, entry-file arguments).

    >>> split_cli(["finetune", "--fast", "configs/x.yaml", "--lora_r", "4"])
    ('sft', True, ['configs/x.yaml', '--lora_r', '4'])
    """
    if not argv or argv[0] not in STAGE_ALIASES:
        got = repr(argv[0]) if argv else "nothing"
        raise UserInputError(f"doctor: the first argument must be pretrain or sft (or finetune), got {got}")
    rest = list(argv[1:])
    fast = FAST_FLAG in rest
    return STAGE_ALIASES[argv[0]], fast, [arg for arg in rest if arg != FAST_FLAG]


def main(argv: list[str]) -> None:
    """Print the report; raise :class:`PreflightError` (exit 2 under ``run_cli``) when a check failed."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")
        if not argv:
            raise UserInputError("doctor: say which stage to check: pretrain or sft")
        return
    stage, fast, rest = split_cli(argv)
    findings = diagnose(stage, rest, fast)
    write_report(findings, sys.stdout, fast)
    errors = [finding for finding in findings if finding.status == ERROR]
    if errors:
        raise PreflightError(f"doctor: {len(errors)} check(s) failed ({', '.join(sorted({e.check for e in errors}))})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
