"""The preflight ``doctor``: each check passes on the tiny defaults and reports the broken input by name.

Checks run in-process through :func:`llmtrain.tools.doctor.diagnose` / ``main`` (fast: no model
weights, no data pass); the CLI's exit code and report lines are covered by
``tests/integration/test_doctor_cli.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmtrain.config.parser import parse_args
from llmtrain.errors import UserInputError
from llmtrain.modeling import load_model_config
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.stages import STAGES, Stage
from llmtrain.tools import doctor
from llmtrain.tools.doctor.cli import split_cli
from llmtrain.tools.doctor.model import count_parameters
from llmtrain.tools.doctor.resources import FP32_BYTES, DiskEstimate, estimate_disk, tokenizer_bytes

from ..conftest import REPO_ROOT, write_jsonl

# Measured on a finished tiny-default run (DeepSpeed ZeRO-2, fp32, 2026-11): checkpoint-336 held 32,661,926 bytes.
MEASURED_TINY_CHECKPOINT_BYTES = 32_661_926
LAUNCHER_ENV = ("NUM_GPUS", "NPROC", "CUDA_VISIBLE_DEVICES", "HOSTFILE")


@pytest.fixture(autouse=True)
def clean_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check reads the launcher's variables; the developer's shell must not leak into tests."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The tiny model's config and tokenizer (chat template included) and no weights at all."""
    directory = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, directory)
    assert not list(directory.glob("*.safetensors")) and not list(directory.glob("*.bin"))
    return directory


def common(tmp_path: Path) -> list[str]:
    return ["--output_dir", str(tmp_path / "out"), "--dataset_cache_dir", str(tmp_path / "cache")]


def errors(findings: list[doctor.Finding], check: str | None = None) -> list[str]:
    return [f.message for f in findings if f.status == doctor.ERROR and (check is None or f.check == check)]


def checks(findings: list[doctor.Finding]) -> set[str]:
    return {finding.check for finding in findings}


EVERY_CHECK = {"config", "gpus", "model", "sequence length", "tokenizer", "data", "output_dir", "disk"}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_default_pretrain_config_passes(tmp_path: Path, fast: bool, capsys: pytest.CaptureFixture[str]) -> None:
    doctor.main(["pretrain", *common(tmp_path), *(["--fast"] if fast else [])])
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.startswith("doctor: ERROR")]
    reported = {line.split(":")[1].split(maxsplit=1)[1] for line in lines if line.startswith("doctor: ok")}
    assert reported >= EVERY_CHECK
    assert any(line.startswith("doctor: ok      library torch:") for line in lines)
    assert ("data sample" in reported) is not fast  # one sample is encoded in full mode only
    assert lines[-1].startswith("doctor: 0 error(s)")
    assert os.listdir(tmp_path) == []  # output_dir not created; the probe in its parent was removed


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_default_sft_config_passes(tmp_path: Path, model_dir: Path, fast: bool) -> None:
    argv = [str(REPO_ROOT / "configs" / "sft_tiny_lora.yaml"), "--model_name_or_path", str(model_dir)]
    findings = doctor.diagnose("sft", [*argv, *common(tmp_path)], fast=fast)
    assert errors(findings) == []
    assert checks(findings) >= EVERY_CHECK
    messages = {f.check: f.message for f in findings}
    assert "chat template present" in messages["tokenizer"]
    assert "lora" in messages["model"]
    if not fast:
        counts = re.search(r"(\d+) tokens, (\d+) supervised$", messages["data sample"])
        assert counts is not None, messages["data sample"]
        assert 0 < int(counts.group(2)) < int(counts.group(1))


def test_fast_mode_reads_no_weights_and_no_whole_file(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fast needs no weights (the model dir has none) and never loads a model or a dataset."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("--fast must not load weights or whole data files")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr("datasets.load_dataset", refuse)
    monkeypatch.setattr("llmtrain.data.conversations.read_conversations", refuse)
    for stage in ("pretrain", "sft"):
        argv = ["--model_name_or_path", str(model_dir), *common(tmp_path)]
        findings = doctor.diagnose(stage, argv, fast=True)
        assert errors(findings) == [], stage
        assert "no weights read" in {f.check: f.message for f in findings}["model"]


def test_sft_tokenizer_without_chat_template_is_an_error(tmp_path: Path, model_dir: Path) -> None:
    (model_dir / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((model_dir / "tokenizer_config.json").read_text())
    findings = doctor.diagnose("sft", ["--model_name_or_path", str(model_dir), *common(tmp_path)], fast=True)
    assert errors(findings) == ["tokenizer_name_or_path: the tokenizer has no chat template"]
    assert any(
        f.line().startswith("doctor: ERROR   tokenizer: tokenizer_name_or_path: the tokenizer has no chat template")
        for f in findings
    )


def test_missing_data_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    findings = doctor.diagnose("pretrain", ["--train_files", str(missing), *common(tmp_path)], fast=True)
    assert errors(findings) == [f"train_files: data file {missing} does not exist"]


def test_bad_first_record_is_an_error_naming_file_and_line(tmp_path: Path, model_dir: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"instruction": "Hi", "output": ""}\n', encoding="utf-8")
    argv = ["--model_name_or_path", str(model_dir), "--train_files", str(good), str(bad), *common(tmp_path)]
    for fast in (True, False):
        found = errors(doctor.diagnose("sft", argv, fast=fast), "data")
        assert len(found) == 1 and found[0].startswith(f"{bad}:2: alpaca record has no content: 'output' is blank")


def test_a_bad_first_record_under_invalid_records_skip_is_a_warning(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Hi", "output": ""}\n{"instruction": "Hi", "output": "Hello"}\n', encoding="utf-8")
    argv = ["--model_name_or_path", str(model_dir), "--train_files", str(bad), "--invalid_records", "skip",
            *common(tmp_path)]  # fmt: skip
    findings = doctor.diagnose("sft", argv, fast=True)
    assert not errors(findings, "data")
    warnings = [f.message for f in findings if f.status == doctor.WARNING and f.check == "data"]
    assert warnings == [
        f"{bad}:1: alpaca record has no content: 'output' is blank (invalid_records: skip leaves it out)"
    ]


def test_pretrain_text_field_missing_is_an_error(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"body": "some text"}])
    findings = doctor.diagnose("pretrain", ["--train_files", str(corpus), *common(tmp_path)], fast=True)
    assert errors(findings, "data") == [f"{corpus}:1: missing field 'text' (fields: body)"]  # as training says it


def test_block_size_beyond_the_model_is_an_error(tmp_path: Path) -> None:
    findings = doctor.diagnose("pretrain", ["--block_size", "2048", *common(tmp_path)], fast=True)
    assert errors(findings) == ["block_size=2048 exceeds the model's max_position_embeddings=1024"]


def test_unknown_config_key_is_an_error_and_stops_the_dependent_checks(tmp_path: Path) -> None:
    findings = doctor.diagnose("pretrain", ["--no_such_field", "1", *common(tmp_path)], fast=True)
    assert errors(findings) == ["unknown argument(s): --no_such_field 1"]
    assert "tokenizer" not in checks(findings) and "gpus" in checks(findings)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o500)
    yield directory
    directory.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_dir_is_an_error(tmp_path: Path, read_only_dir: Path) -> None:
    argv = ["--output_dir", str(read_only_dir / "run"), "--dataset_cache_dir", str(tmp_path / "cache")]
    found = errors(doctor.diagnose("pretrain", argv, fast=True), "output_dir")
    assert len(found) == 1 and found[0].startswith(f"output_dir: cannot write in {read_only_dir}")


def test_refused_probe_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only or full filesystem looks like to the probe, also when running as root."""

    def refuse(**kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("llmtrain.paths.tempfile.mkstemp", refuse)
    found = errors(doctor.diagnose("pretrain", common(tmp_path), fast=True), "output_dir")
    assert found == [f"output_dir: cannot write in {tmp_path} (Permission denied)"]


def test_output_dir_below_a_file_is_an_error(tmp_path: Path) -> None:
    """The root-proof variant of the unwritable case: nothing can be created under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["--output_dir", str(blocker / "run"), "--dataset_cache_dir", str(tmp_path / "cache")]
    found = errors(doctor.diagnose("pretrain", argv, fast=True), "output_dir")
    assert found == [f"output_dir: {blocker} is not a directory, so {blocker / 'run'} cannot be created there"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no probe left behind, nothing created


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this node has two GPUs")
def test_more_gpus_asked_for_than_visible_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUM_GPUS", "2")
    findings = doctor.diagnose("pretrain", common(tmp_path), fast=True)
    assert errors(findings) == [f"NUM_GPUS=2 but torch sees {torch.cuda.device_count()} GPU(s) on this node"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU topology")
def test_cpu_ranks_and_bf16_on_cpu_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPROC", "2")
    findings = doctor.diagnose("pretrain", ["--use_cpu", "true", "--bf16", "true", *common(tmp_path)], fast=True)
    gpu_lines = [(f.status, f.message) for f in findings if f.check == "gpus"]
    assert gpu_lines[0] == (doctor.OK, "no GPU (torch sees 0): CPU: 2 rank(s) on gloo, --use_cpu")
    assert gpu_lines[1][0] == doctor.WARNING and "bf16" in gpu_lines[1][1]
    monkeypatch.setenv("NPROC", "two")
    assert errors(doctor.diagnose("pretrain", common(tmp_path), fast=True)) == ["NPROC='two' must be a whole number"]


def test_hostfile_ranks_are_the_hostfile_slots_not_this_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU-less head node launching onto GPU hosts: GPU ranks, and this node's GPUs are not compared."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two GPU nodes\nnode-a slots=8\nnode-b slots=4\n")
    monkeypatch.setenv("HOSTFILE", str(hostfile))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: the head has no GPU
    findings = doctor.diagnose("pretrain", common(tmp_path), fast=True)
    assert not errors(findings)
    gpu_lines = [f.message for f in findings if f.check == "gpus"]
    assert gpu_lines == [
        f"HOSTFILE={hostfile}: 12 GPU rank(s) over 2 host(s), the hostfile's slots (the hosts themselves are not "
        "checked from here)"
    ]
    monkeypatch.setenv("NPROC", "2")
    gpu_lines = [f.message for f in doctor.diagnose("pretrain", common(tmp_path), fast=True) if f.check == "gpus"]
    assert gpu_lines[0].startswith(f"HOSTFILE={hostfile}: 12 CPU rank(s) on gloo (NPROC is set) over 2 host(s)")
    hostfile.write_text("node-a 8\n")
    assert errors(doctor.diagnose("pretrain", common(tmp_path), fast=True)) == [
        f"HOSTFILE={hostfile}: bad line 'node-a 8' (DeepSpeed's format is 'host slots=N')"
    ]


def test_num_gpus_beyond_cuda_visible_devices_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUM_GPUS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # a device every GPU node has, should torch initialise here
    findings = doctor.diagnose("pretrain", common(tmp_path), fast=True)
    assert errors(findings, "gpus") == ["NUM_GPUS=2 but CUDA_VISIBLE_DEVICES='0' lists 1 GPU(s)"]


def tiny_estimate(tmp_path: Path, stage: str, *extra: str) -> DiskEstimate:
    spec = STAGES[stage]
    parsed = parse_args(spec.dataclass_types(), [*common(tmp_path), *extra], spec.default_config)
    model_args, training_args = parsed[0], parsed[-1]
    method_args = parsed[2] if stage == "sft" else None
    counts = count_parameters(load_model_config(model_args), model_args, method_args)
    return estimate_disk(counts, FP32_BYTES, training_args, tokenizer_bytes(str(TINY_MODEL_DIR)))


def test_disk_estimate_of_the_tiny_model(tmp_path: Path) -> None:
    one, three = (tiny_estimate(tmp_path, "pretrain", "--save_total_limit", str(n)) for n in (1, 3))
    assert 0 < one.total < 200e6  # a 1.5 M-parameter model: tens of MB, not GB
    assert (one.checkpoints, three.checkpoints) == (2, 4)  # the limit + the one being written
    assert three.total - one.total == 2 * one.per_checkpoint > 0
    deepspeed = tiny_estimate(
        tmp_path, "pretrain", "--deepspeed", str(REPO_ROOT / "ds_config_zero2.json"), "--use_cpu", "true"
    )
    assert deepspeed.per_checkpoint == pytest.approx(MEASURED_TINY_CHECKPOINT_BYTES, rel=0.1)
    sft = {
        method: tiny_estimate(tmp_path, "sft", "--model_name_or_path", str(TINY_MODEL_DIR), "--finetuning_type", method)
        for method in ("lora", "full")
    }
    assert 0 < sft["lora"].per_checkpoint < sft["full"].per_checkpoint / 3  # adapters only, not the base


def test_too_little_disk_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full_disk = SimpleNamespace(total=10**12, used=0, free=1000)
    monkeypatch.setattr("llmtrain.tools.doctor.resources.shutil.disk_usage", lambda path: full_disk)
    found = errors(doctor.diagnose("pretrain", common(tmp_path), fast=True), "disk")
    assert len(found) == 1 and found[0].startswith("output_dir: 1.0 kB free at")


def test_bad_stage_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="pretrain or sft"):
        doctor.main(["train"])


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_missing_local_model_dir_is_an_error_without_network(tmp_path: Path, fast: bool) -> None:
    missing = tmp_path / "pretrain-tiny"
    findings = doctor.diagnose("sft", ["--model_name_or_path", str(missing), *common(tmp_path)], fast=fast)
    assert errors(findings) == [
        f"model_name_or_path: {missing} does not exist (run bash pretrain.sh first: it writes it)"
    ]


def test_uncached_hub_id_is_only_a_warning_in_fast_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    argv = ["--model_name_or_path", "example-org/never-downloaded-model", *common(tmp_path)]
    findings = doctor.diagnose("sft", argv, fast=True)
    assert errors(findings) == []
    warnings = [f.message for f in findings if f.status == doctor.WARNING and f.check == "model"]
    assert warnings == [
        "model_name_or_path: example-org/never-downloaded-model is not in the hub cache; training would download it "
        "(not checked in --fast)"
    ]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert errors(doctor.diagnose("sft", argv, fast=True)) == [
        "model_name_or_path: example-org/never-downloaded-model is not in the hub cache and HF_HUB_OFFLINE is set"
    ]


class ParseCalled(Exception):
    """Raised by the spy below in place of parsing: the drift guard needs only what parse_args was given."""


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_entry_file_and_doctor_parse_with_the_same_stage(stage_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drift guard: the doctor must read a config exactly as the stage's entry file does.

    The entry file is loaded as a module (its ``__main__`` guard keeps training from starting) and
    its ``main`` run up to ``parse_args``, which a spy records and stops; the doctor's parse is
    recorded the same way. Both must pass the stage's dataclasses and default config.
    """
    stage = STAGES[stage_name]
    spec = importlib.util.spec_from_file_location(f"entry_{stage_name}", stage.entry_path)
    assert spec is not None and spec.loader is not None
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    used = [value for value in vars(entry).values() if isinstance(value, Stage)]
    assert used and all(value is stage for value in used), used

    parsed_with: list[tuple[tuple[type, ...], Path | None]] = []

    def record_parse(*args: object, **kwargs: object) -> None:
        bound = inspect.signature(parse_args).bind(*args, **kwargs)
        bound.apply_defaults()
        parsed_with.append((tuple(bound.arguments["dataclass_types"]), bound.arguments["default_config"]))
        raise ParseCalled

    monkeypatch.setattr(entry, "parse_args", record_parse)
    # Not under test, and on CPU it imports DeepSpeed's ops to switch one off for the whole process.
    monkeypatch.setattr(entry, "disable_unused_cpu_ops", lambda: None, raising=False)
    with pytest.raises(ParseCalled):
        entry.main([])
    monkeypatch.setattr("llmtrain.tools.doctor.diagnosis.parse_args", record_parse)
    doctor.diagnose(split_cli([stage.entry_path.stem])[0], [], fast=True)  # the stage name the launcher passes
    assert parsed_with == [(stage.dataclass_types(), stage.default_config)] * 2


def test_pickle_only_weights_are_an_error_before_anything_loads(tmp_path: Path, model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    if weights.exists():
        weights.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    findings = doctor.diagnose("sft", ["--model_name_or_path", str(model_dir), *common(tmp_path)], fast=True)
    assert [message for message in errors(findings, "model") if "holds its weights only as pickle" in message] == [
        f"model_name_or_path: {model_dir} holds its weights only as pickle (pytorch_model.bin), which can run code "
        "when loaded; only safetensors are read. Convert it once where you trust the file, e.g. "
        "from_pretrained(dir, use_safetensors=False).save_pretrained(new_dir), which writes safetensors"
    ]


def test_an_output_dir_held_by_a_live_launch_is_an_error(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = subprocess.Popen(  # another live process holds the lock, as a running launch would
        [sys.executable, "-c", "import time; from pathlib import Path; from llmtrain.run.lock import OutputDirLock; "
         f"OutputDirLock(Path({str(busy / '.llmtrain.lock')!r})).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        argv = [*common(tmp_path), "--output_dir", str(busy)]
        found = errors(doctor.diagnose("pretrain", argv, fast=True), "output_dir")
    finally:
        holder.kill()
        holder.wait()
    assert len(found) == 1 and f"output_dir {busy} is in use by another launch: host " in found[0], found
    assert f"pid {holder.pid}" in found[0]
