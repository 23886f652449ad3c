"""The bad-input catalogue: each case through the real entry point, as a user would run it.

Each case is its own ``python ENTRY ARGS`` process, forked from an entry server that imported the entry
points once (the same argv, directory, environment and exit code; a few cases are also run as a plain
``python ENTRY`` process and must refuse the same way), and the two resume refusals launch it plainly.

Every case must end with exactly one ERROR line that names the file:line or the field, exit
code 2, no traceback, and nothing written: an output dir that did not exist still does not, one
that did (another run's model, an earlier checkpoint) is byte-for-byte unchanged, and no
half-built dataset is left in the cache (for refusals of the data itself, no dataset at all).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as safetensors_load

from llmtrain.errors import USER_ERROR_EXIT_CODE
from llmtrain.run.lock import LOCK_FILE, OutputDirLock

from ..conftest import (
    REPO_ROOT,
    EntryServer,
    built_once,
    prose_records,
    qa_conversations,
    run_entry,
    save_random_tiny_model,
    shared_entry_server,
    write_jsonl,
)

GOOD_CHAT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
TWO_SYSTEM_PROMPTS = {
    "system": "Be brief.",
    "conversations": [{"from": "system", "value": "Be kind."}, *GOOD_CHAT["conversations"]],
}


@dataclass
class Case:
    entry: str  # pretrain.py or finetune.py
    args: list[str]
    error: str  # regex the single ERROR line must match
    output_dir: Path
    no_dataset: bool = False  # refused for its data: not even a complete dataset may be left in the cache


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_tiny_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def interrupted_lora_run(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> tuple[Path, list[str]]:
    """A LoRA SFT run (r=8) killed after step 3, leaving a complete checkpoint-2 and no final model."""
    root = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(root / "chat.jsonl", qa_conversations(40))
    args = [*sft_args(root, base_model, data, root / "out"), "--lora_r", "8", "--max_steps", "6", "--save_steps", "2"]
    result = run_entry(args, root, entry="finetune.py", LLMTRAIN_FAULT="kill_after_step=3")
    assert result.returncode == -9, result.stdout[-3000:] + result.stderr[-3000:]
    assert (root / "out" / "checkpoint-2" / "llmtrain_complete.json").is_file()
    return root / "out", args


@pytest.fixture(scope="module")
def interrupted_pretraining(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    """A pretraining run killed after step 3: a complete checkpoint-2, no final model; its corpus."""
    root = tmp_path_factory.mktemp("pretrain-run")
    corpus = write_jsonl(root / "corpus.jsonl", prose_records(300))
    args = [*pretrain_args(root, corpus, root / "out"), "--max_steps", "5", "--save_steps", "2"]
    result = run_entry(args, root, LLMTRAIN_FAULT="kill_after_step=3")
    assert result.returncode == -9, result.stdout[-3000:] + result.stderr[-3000:]
    assert (root / "out" / "checkpoint-2" / "llmtrain_complete.json").is_file()
    return root / "out", args, corpus


def pretrain_args(tmp: Path, corpus: Path, output_dir: Path) -> list[str]:
    return [
        "--train_files", str(corpus), "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true",
        "--dataset_cache_dir", str(tmp / "cache"), "--max_steps", "2",
    ]  # fmt: skip


def sft_args(tmp: Path, base_model: Path, data: Path, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(base_model), "--train_files", str(data), "--output_dir", str(output_dir),
        "--report_to", "none", "--use_cpu", "true", "--dataset_cache_dir", str(tmp / "cache"),
        "--validation_split_percentage", "0", "--eval_strategy", "no", "--max_steps", "2",
        "--finetuning_type", "lora",
    ]  # fmt: skip


def write_file(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def pretrain_case(
    content: str | bytes, extra: list[str], error: str, no_dataset: bool = False
) -> Callable[[Path, Path], Case]:
    def make(tmp: Path, base_model: Path) -> Case:
        corpus = write_file(tmp / "corpus.jsonl", content)
        return Case("pretrain.py", [*pretrain_args(tmp, corpus, tmp / "out"), *extra], error, tmp / "out", no_dataset)

    return make


def sft_case(
    records: list[object], extra: list[str], error: str, no_dataset: bool = False
) -> Callable[[Path, Path], Case]:
    def make(tmp: Path, base_model: Path) -> Case:
        data = write_jsonl(tmp / "data.jsonl", records)
        args = [*sft_args(tmp, base_model, data, tmp / "out"), *extra]
        return Case("finetune.py", args, error, tmp / "out", no_dataset)

    return make


def data_file_linked_to_dev_null(tmp: Path, base_model: Path) -> Case:
    (tmp / "corpus.jsonl").symlink_to("/dev/null")
    error = r"train_files: .*corpus\.jsonl \(a symbolic link to /dev/null\) is a character device, not a data file"
    return Case("pretrain.py", pretrain_args(tmp, tmp / "corpus.jsonl", tmp / "out"), error, tmp / "out", True)


def tokenizer_without_chat_template(tmp: Path, base_model: Path) -> Case:
    model = tmp / "no-template"
    shutil.copytree(base_model, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp / "data.jsonl", qa_conversations(8))
    return Case("finetune.py", sft_args(tmp, model, data, tmp / "out"), r"chat template", tmp / "out")


def unknown_yaml_key(tmp: Path, base_model: Path) -> Case:
    config = tmp / "run.yaml"
    config.write_text("learning_rate: 1.0e-3\nblock_sise: 128\n")
    corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(5))
    return Case("pretrain.py", [str(config), *pretrain_args(tmp, corpus, tmp / "out")], r"run\.yaml:2.*block_sise",
                tmp / "out")  # fmt: skip


def yaml_case(content: str | bytes, error: str) -> Callable[[Path, Path], Case]:
    def make(tmp: Path, base_model: Path) -> Case:
        config = write_file(tmp / "run.yaml", content)
        corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(5))
        return Case("pretrain.py", [str(config), *pretrain_args(tmp, corpus, tmp / "out")], error, tmp / "out")

    return make


def missing_config_file(tmp: Path, base_model: Path) -> Case:
    return Case("pretrain.py", [str(tmp / "no-such.yaml")], r"no-such\.yaml does not exist", tmp / "outputs")


def output_dir_of_another_run(tmp: Path, base_model: Path) -> Case:
    output_dir = tmp / "out"
    output_dir.mkdir()
    (output_dir / "run_config.yaml").write_text("learning_rate: 0.5\n")
    (output_dir / "model.safetensors").write_bytes(b"weights of another run")
    corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(5))
    return Case("pretrain.py", pretrain_args(tmp, corpus, output_dir), r"holds a finished model of another run",
                output_dir)  # fmt: skip


def unwritable_output_dir(tmp: Path, base_model: Path) -> Case:
    # A path under a regular file: unwritable for root too (chmod does not stop root).
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(200))
    return Case("pretrain.py", pretrain_args(tmp, corpus, blocker / "out"), r"output_dir .*a-file/out is not writable",
                blocker / "out")  # fmt: skip


def pickle_only_model(tmp: Path, base_model: Path) -> Case:
    model = tmp / "pickled"
    shutil.copytree(base_model, model)
    torch.save(safetensors_load(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    data = write_jsonl(tmp / "data.jsonl", qa_conversations(8))
    error = r"model_name_or_path: .*pickled holds its weights only as pickle \(pytorch_model\.bin\)"
    return Case("finetune.py", sft_args(tmp, model, data, tmp / "out"), error, tmp / "out")


def output_dir_is_a_file(tmp: Path, base_model: Path) -> Case:
    output_dir = tmp / "out"
    output_dir.write_text("a file where the output dir should be")
    corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(200))
    error = r"output_dir .*out is not writable: .*not a directory"
    return Case("pretrain.py", pretrain_args(tmp, corpus, output_dir), error, output_dir)


def output_dir_in_use(tmp: Path, base_model: Path) -> Case:
    output_dir = tmp / "out"
    output_dir.mkdir()
    # Held by this (live) test process for the rest of the session, as a first launch would hold it.
    OutputDirLock(output_dir / LOCK_FILE).acquire(run_id="the-first-launch")
    corpus = write_jsonl(tmp / "corpus.jsonl", prose_records(5))
    error = rf"output_dir .*out is in use by another launch: host {socket.gethostname()}, pid {os.getpid()}, started "
    return Case("pretrain.py", pretrain_args(tmp, corpus, output_dir), error, output_dir)


CASES: dict[str, Callable[[Path, Path], Case]] = {
    "malformed-json-line": pretrain_case('{"text": "fine"}\n{"text": oops}\n', [], r"corpus\.jsonl:2: invalid JSON"),
    "non-utf8-bytes": pretrain_case(b'{"text": "fine"}\n{"text": "caf\xe9"}\n', [], r"corpus\.jsonl:2: .*UTF-8"),
    "empty-file": pretrain_case("", [], r"corpus\.jsonl: the file is empty"),
    "missing-field": pretrain_case('{"text": "a"}\n{"content": "b"}\n', [], r"corpus\.jsonl:2: missing field 'text'"),
    "wrong-value-type-in-data": pretrain_case('{"text": "a"}\n{"text": 5}\n', [], r"corpus\.jsonl:2: .*text"),
    "wrong-value-type-in-field": pretrain_case('{"text": "a"}\n', ["--max_steps", "many"], r"max_steps"),
    "block-size-above-positions": pretrain_case(
        '{"text": "a"}\n', ["--block_size", "4096"], r"block_size=4096 exceeds the model's max_position_embeddings"
    ),
    "unknown-role": sft_case(
        [GOOD_CHAT, {"conversations": [{"from": "bot", "value": "a"}]}], [], r"data\.jsonl:2: unknown role 'bot'"
    ),
    "no-assistant-turn": sft_case(
        [GOOD_CHAT, {"conversations": [{"from": "human", "value": "anyone?"}]}], [], r"data\.jsonl:2: .*assistant"
    ),
    "over-length-with-truncation-error": sft_case(
        qa_conversations(4), ["--max_seq_length", "16", "--truncation_strategy", "error"],
        r"data\.jsonl:1: \d+ tokens exceed max_seq_length=16 \(truncation_strategy: error\)",
    ),
    "unknown-end-of-turn-token": sft_case(
        qa_conversations(8), ["--end_of_turn_token", "<|end_of_answer|>"], r"end_of_turn_token"
    ),
    "lora-target-mismatch": sft_case(
        qa_conversations(40), ["--lora_target_modules", "q_proj,attn_qkv"],
        r"lora_target_modules: attn_qkv match\(es\) nothing in the model",
    ),
    "conversations-not-a-list": sft_case(
        [{"conversations": "hello"}], [], r"data\.jsonl:1: 'conversations' must be a list"
    ),
    "turn-without-content": sft_case(
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}], [],
        r"data\.jsonl:1: turn 2 \(assistant\) has no content",
    ),
    "too-many-invalid-records": sft_case(
        [GOOD_CHAT, GOOD_CHAT, GOOD_CHAT, {"conversations": [{"from": "human", "value": "anyone?"}]}],
        ["--invalid_records", "skip"],
        r"train_files: 1 of 4 records are invalid \(25\.00%\), more than max_invalid_share=0\.01 "
        r"\(no_assistant_turn: 1\)",
    ),
    "reasoning-the-template-drops": sft_case(
        [{"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello", "reasoning_content": "a greeting: greet back"}]}],
        [], r"data\.jsonl:1: assistant turn 1 has reasoning_content, but the chat template does not render it",
    ),
    "no-known-format": sft_case([{"prompt": "a", "completion": "b"}], [], r"data\.jsonl:1: record is in no known"),
    "conversation-opening-with-an-answer": sft_case(
        [GOOD_CHAT, {"conversations": [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hi again"}]}],
        [], r"data\.jsonl:2: the conversation opens with an assistant turn",
    ),
    "lone-surrogate-escape": sft_case(
        [GOOD_CHAT, {"conversations": [{"from": "human", "value": "\ud800"}, {"from": "gpt", "value": "a"}]}],
        [], r"data\.jsonl:2: a lone UTF-16 surrogate escape",
    ),
    "blank-documents-only": pretrain_case(
        '{"text": ""}\n{"text": "   "}\n', ["--preprocessing_batch_size", "1", "--validation_split_percentage", "0"],
        r"train_files: 2 documents make no full block", no_dataset=True,
    ),
    "data-file-linked-to-dev-null": data_file_linked_to_dev_null,
    "two-system-prompts": sft_case(
        [GOOD_CHAT, TWO_SYSTEM_PROMPTS], [],
        r"data\.jsonl:2: the record has a top-level 'system' and a system message in turn 1", no_dataset=True,
    ),
    "zero-max-steps": pretrain_case('{"text": "a"}\n', ["--max_steps", "0"], r"max_steps=0, .* trains nothing"),
    "zero-epochs": pretrain_case(
        '{"text": "a"}\n', ["--max_steps", "-1", "--num_train_epochs", "0"], r"num_train_epochs=0\.0 trains nothing"
    ),
    "pickle-only-weights": pickle_only_model,
    "output-dir-is-a-file": output_dir_is_a_file,
    "output-dir-in-use": output_dir_in_use,
    "tokenizer-without-chat-template": tokenizer_without_chat_template,
    "unknown-yaml-key": unknown_yaml_key,
    "missing-config-file": missing_config_file,
    "yaml-tab-indent": yaml_case(
        "learning_rate: 1.0e-4\n\tblock_size: 64\n", r"run\.yaml:2:1: invalid YAML: .*indents with spaces, not tabs"
    ),
    "yaml-top-level-list": yaml_case(
        "- learning_rate: 1.0e-4\n", r"run\.yaml:1: a run config must be a mapping of field: value, not a list"
    ),
    "yaml-non-utf8": yaml_case(b"learning_rate: 1.0e-4\nrun_name: caf\xe9\n", r"run\.yaml:2:14: not UTF-8 text"),
    "yaml-duplicate-key": yaml_case(
        "learning_rate: 1.0e-4\nlearning_rate: 2.0e-4\n",
        r"run\.yaml:2: 'learning_rate' is set twice \(first on line 1\)",
    ),
    "output-dir-of-another-run": output_dir_of_another_run,
    "unwritable-output-dir": unwritable_output_dir,
}  # fmt: skip


def snapshot(directory: Path) -> dict[str, str] | None:
    """Every file under ``directory`` with its SHA-256, or None when it does not exist."""
    if not directory.exists():
        return None
    if directory.is_file():
        return {"": hashlib.sha256(directory.read_bytes()).hexdigest()}
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def assert_fails_cleanly(case: Case, tmp: Path) -> str:
    before = snapshot(case.output_dir)
    result = run_entry(case.args, tmp, entry=case.entry)
    return check_clean_failure(case, tmp, result, before)


def check_clean_failure(
    case: Case, tmp: Path, result: subprocess.CompletedProcess[str], before: dict[str, str] | None
) -> str:
    """The one ERROR line of a run that failed as a bad input must: exit 2, no traceback, nothing written."""
    output = result.stdout + result.stderr
    assert result.returncode == USER_ERROR_EXIT_CODE, output[-4000:]
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stdout[-4000:]
    assert re.search(case.error, errors[0]), errors[0]
    assert "Traceback" not in output
    assert snapshot(case.output_dir) == before, "the output dir was written to"
    assert not list((tmp / "cache").glob(".*partial*")), "a half-built dataset was left in the cache"
    if case.no_dataset:
        assert not (tmp / "cache").exists() or not any((tmp / "cache").iterdir()), "a refused dataset was left"
    return errors[0]


@dataclass
class Attempt:
    """One catalogue case as it was run: its case, folder, output-dir snapshot before, and the run (or its error)."""

    case: Case | None
    tmp: Path
    before: dict[str, str] | None
    result: subprocess.CompletedProcess[str] | BaseException


@pytest.fixture(scope="module")
def attempts(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Attempt]:
    """Every catalogue case, each its own ``python ENTRY ARGS`` run forked from one of two entry servers
    (the session's and one more :class:`tests.conftest.EntryServer`: the entry points imported once, not
    ~4 s of imports per case), two at a time on the 2 cores of CI; built once for the whole session
    (:func:`tests.conftest.built_once`). ``test_the_entry_server_runs_a_case_as_python_would`` checks that
    a real ``python ENTRY`` launch gives the same refusal."""

    def build(root: Path) -> dict[str, Attempt]:
        servers: queue.Queue[EntryServer] = queue.Queue()
        with ThreadPoolExecutor(max_workers=2) as pool:  # started side by side
            started = [pool.submit(shared_entry_server), pool.submit(EntryServer, root / "server")]
            own = started[1].result()
            for future in started:
                servers.put(future.result())

        def attempt(name: str) -> tuple[str, Attempt]:
            tmp = root / name
            tmp.mkdir()
            server = servers.get()
            try:
                case = CASES[name](tmp, base_model)
                before = snapshot(case.output_dir)
                return name, Attempt(case, tmp, before, server.run(case.args, tmp, entry=case.entry))
            except BaseException as error:  # reported by that case's test, not by every one
                return name, Attempt(None, tmp, None, error)
            finally:
                servers.put(server)

        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                return dict(pool.map(attempt, sorted(CASES)))
        finally:
            own.close()

    return built_once(tmp_path_factory, "bad-input-catalogue", build)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_with_one_clear_error_and_writes_nothing(name: str, attempts: dict[str, Attempt]) -> None:
    attempt = attempts[name]
    if isinstance(attempt.result, BaseException):
        raise attempt.result
    assert attempt.case is not None
    check_clean_failure(attempt.case, attempt.tmp, attempt.result, attempt.before)


@pytest.mark.parametrize("name", ["lora-target-mismatch"])
def test_the_entry_server_runs_a_case_as_python_would(
    name: str, attempts: dict[str, Attempt], base_model: Path, tmp_path: Path
) -> None:
    """The same case as a real ``python ENTRY ARGS`` process: the same exit code, the same one ERROR line."""
    served = attempts[name]
    assert isinstance(served.result, subprocess.CompletedProcess) and served.case is not None
    case = CASES[name](tmp_path, base_model)
    error = assert_fails_cleanly(case, tmp_path)
    served_errors = [line for line in served.result.stdout.splitlines() if " ERROR " in line]
    strip = re.compile(r"^\S+ |" + re.escape(str(served.tmp)) + "|" + re.escape(str(tmp_path)))
    assert [strip.sub("", line) for line in served_errors] == [strip.sub("", error)]


def test_resuming_a_lora_run_with_changed_lora_settings_is_refused(
    interrupted_lora_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    output_dir, args = interrupted_lora_run
    changed = [*args, "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"]
    error = assert_fails_cleanly(Case("finetune.py", changed, r"checkpoint-2 was trained with other", output_dir),
                                 output_dir.parent)  # fmt: skip
    assert "lora_r: 8 -> 4" in error and "lora_target_modules" in error


def test_data_edited_between_a_kill_and_the_resume_is_refused_unless_allowed(
    interrupted_pretraining: tuple[Path, list[str], Path],
) -> None:
    output_dir, args, corpus = interrupted_pretraining
    with corpus.open("a", encoding="utf-8") as handle:  # one document appended, as a data refresh would
        handle.write('{"text": "a document that was not there when the run started"}\n')
    cached = sorted((output_dir.parent / "cache").iterdir())
    error = assert_fails_cleanly(
        Case(
            "pretrain.py", args, r"train_files: the training data changed since .*checkpoint-2 was written", output_dir
        ),
        output_dir.parent,
    )
    assert f"{corpus} changed (" in error
    assert sorted((output_dir.parent / "cache").iterdir()) == cached, "the refused resume tokenized the edited data"
    assert "--start_over true" in error and "--allow_data_change true" in error
    resumed = run_entry([*args, "--allow_data_change", "true"], output_dir.parent)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (
        f"allow_data_change: resuming {output_dir}/checkpoint-2 on changed data ({'train_files: ' + str(corpus)}"
        in (resumed.stdout)
    )
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 5 and summary["resumed_from"] == str(output_dir / "checkpoint-2")


# The catalogue's cases beyond CASES: the two resume refusals above.
RESUME_CASES = (
    test_resuming_a_lora_run_with_changed_lora_settings_is_refused,
    test_data_edited_between_a_kill_and_the_resume_is_refused_unless_allowed,
)


def test_the_readme_and_the_reliability_table_count_the_catalogue_as_it_is() -> None:
    count = len(CASES) + len(RESUME_CASES)
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    reliability = (REPO_ROOT / "docs" / "resume-and-reliability.md").read_text(encoding="utf-8")
    assert re.findall(r"bad-input catalogue \((\d+) cases\)", readme) == [str(count)]
    assert re.findall(r"A catalogue of (\d+) cases", reliability) == [str(count)]
