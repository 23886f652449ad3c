"""Post-training tools (merge, chat, compare) on tiny Qwen2 models built and trained in-process.

Fixtures: a random tiny model saved with the embedded tokenizer (the "base"), a non-zero LoRA
adapter on it, and a "chat model" overfitted in a few seconds on one ChatML conversation so that
its greedy answer is known exactly.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from llmtrain.cli import run_cli
from llmtrain.errors import USER_ERROR_EXIT_CODE, ConfigError, UserInputError
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.tiny_default import CHATML_TEMPLATE, IM_END
from llmtrain.tools import chat, compare, merge

QUESTION = "What is 2+2?"
ANSWER = "Four."
CONVERSATION = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
OVERFIT_STEPS = 150  # greedy already answers exactly after ~20; the rest is margin
OVERFIT_LR = 3e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_tiny_model(seed: int) -> Any:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR)).eval()


def save_with_tokenizer(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_tokenizer(random_tiny_model(seed=0), tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) B, so applying or merging it changes the logits."""
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # so the adapter records base_dir as its base
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return save_with_tokenizer(get_peft_model(base, lora), tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model overfitted on CONVERSATION (loss on the assistant turn and its ``<|im_end|>``)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_tensors="pt")
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    input_ids = full["input_ids"]
    prompt_length = len(prompt["input_ids"])
    assert input_ids[0, :prompt_length].tolist() == prompt["input_ids"]  # the generation prompt is a prefix
    labels = input_ids.clone()
    labels[:, :prompt_length] = -100
    model = random_tiny_model(seed=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OVERFIT_LR)
    for _ in range(OVERFIT_STEPS):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.01
    return save_with_tokenizer(model.eval(), tmp_path_factory.mktemp("chat") / "model")


def probe_logits_of(model: Any) -> list[torch.Tensor]:
    return merge.probe_logits(model, merge.probe_inputs(AutoTokenizer.from_pretrained(TINY_MODEL_DIR)))


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


# --- merge -----------------------------------------------------------------------------------


def test_merged_model_equals_base_plus_adapter_and_differs_from_base(
    base_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "merged"
    reported = merge.merge_adapter(adapter_dir, output)

    assert reported <= merge.DEFAULT_TOLERANCE
    merged = probe_logits_of(AutoModelForCausalLM.from_pretrained(output, use_safetensors=True).eval())
    base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    bare = probe_logits_of(base_model)
    with_adapter = probe_logits_of(PeftModel.from_pretrained(base_model, adapter_dir).eval())
    assert merge.max_logit_difference(merged, with_adapter) <= merge.DEFAULT_TOLERANCE
    assert merge.max_logit_difference(merged, bare) > 1e-2  # the adapter really changed something


def test_merged_dir_is_a_complete_chat_model(adapter_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "merged"
    umask = os.umask(0o022)
    try:
        merge.merge_adapter(adapter_dir, output)
    finally:
        os.umask(umask)
    # Readable by a serving container or another user (mkdtemp makes 0700, safetensors writes 0600).
    assert stat.S_IMODE(output.stat().st_mode) == 0o755
    assert {stat.S_IMODE(path.stat().st_mode) for path in output.iterdir()} == {0o644}

    names = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "chat_template.jinja", "tokenizer.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]  # no staging dir left behind
    assert AutoTokenizer.from_pretrained(output).chat_template == CHATML_TEMPLATE
    reloaded = AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    im_end = AutoTokenizer.from_pretrained(output).convert_tokens_to_ids(IM_END)
    assert im_end in reloaded.generation_config.eos_token_id


def test_merge_refuses_a_non_empty_output(adapter_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        merge.merge_adapter(adapter_dir, output)
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_merge_that_changes_the_model_is_refused_and_writes_nothing(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a broken merge: the adapter is dropped instead of folded into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    with pytest.raises(merge.MergeMismatchError, match="nothing was written"):
        merge.merge_adapter(adapter_dir, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_merge_cli(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "merged"
    merge.main(["--adapter", str(adapter_dir), "--output", str(output), "--base", str(base_dir)])
    assert (output / "model.safetensors").is_file()


def test_merge_cli_error_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "o")])
    assert run_cli(merge.main) == USER_ERROR_EXIT_CODE
    assert "adapter_config.json" in caplog.text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        (chat, ["--model", "MODEL", "--prompt", QUESTION]),
        (merge, ["--adapter", "MODEL", "--output", "OUTPUT"]),
        (compare, ["--models", "MODEL", "--prompts", QUESTION, "--output", "OUTPUT"]),
    ],
    ids=["chat", "merge", "compare"],
)
def test_a_tool_refuses_a_secret_flag_before_it_runs(
    tool: Any,
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Each tool's own argparse would echo the flag back, value and all, as an unrecognized argument.
    token = "hf_toolSecretValue9"
    named = {"MODEL": str(tmp_path / "model"), "OUTPUT": str(tmp_path / "output")}
    monkeypatch.setattr(sys, "argv", [tool.__name__, *(named.get(arg, arg) for arg in args), f"--hub-token={token}"])
    assert run_cli(tool.main) == USER_ERROR_EXIT_CODE
    (error,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert error == (
        "--hub-token is not supported (a credential never goes in a flag, which ps and every record of the command "
        "show): set the HF_TOKEN environment variable instead (or run `hf auth login`)"
    )
    printed = capsys.readouterr()
    assert token not in caplog.text + printed.out + printed.err
    assert not (tmp_path / "output").exists()


# --- chat ------------------------------------------------------------------------------------


def test_chat_answers_and_stops_at_end_of_turn(chat_model_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(chat_model_dir)
    messages = [{"role": "user", "content": QUESTION}]

    assert chat.chat_reply(model, tokenizer, messages, max_new_tokens=16) == (ANSWER, True)
    ids = chat.generate_reply_ids(model, tokenizer, messages, max_new_tokens=16)
    assert int(ids[-1]) == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.decode(ids) == ANSWER + IM_END


def test_chat_samples_with_a_temperature(chat_model_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(chat_model_dir)
    torch.manual_seed(0)
    reply = chat.chat_reply(model, tokenizer, [{"role": "user", "content": QUESTION}], 16, temperature=0.5)
    assert reply == (ANSWER, True)  # overfitted: sampling at T=0.5 still follows the learnt answer


def test_chat_reply_cut_by_max_new_tokens_is_not_end_of_turn(chat_model_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(chat_model_dir)
    answer, stopped = chat.chat_reply(model, tokenizer, [{"role": "user", "content": QUESTION}], max_new_tokens=1)
    assert not stopped
    assert ANSWER.startswith(answer) and answer != ANSWER


def test_chat_with_an_adapter_uses_base_plus_adapter(base_dir: Path, adapter_dir: Path) -> None:
    model, _ = chat.load_chat_model(base_dir, adapter_dir)
    assert isinstance(model, PeftModel)
    expected = probe_logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir))
    assert merge.max_logit_difference(probe_logits_of(model), expected) == 0.0


def test_tokenizer_without_chat_template_is_a_clear_error(chat_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = chat.load_chat_model(chat_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.chat_reply(model, tokenizer, [{"role": "user", "content": QUESTION}], max_new_tokens=4)

    no_template_dir = tmp_path / "no-template"
    model.save_pretrained(no_template_dir)
    tokenizer.save_pretrained(no_template_dir)
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.load_chat_model(no_template_dir)


def test_tokenizer_without_im_end_is_a_clear_error() -> None:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = CHATML_TEMPLATE
    with pytest.raises(chat.ChatTemplateError, match=re.escape(IM_END)):
        chat.end_of_turn_id(tokenizer)


def test_chat_loop_keeps_history_resets_and_exits(chat_model_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(chat_model_dir)
    out = io.StringIO()
    history = chat.chat_loop(model, tokenizer, [QUESTION, "", QUESTION], out, max_new_tokens=16)
    assert [message["role"] for message in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == ANSWER

    out = io.StringIO()
    lines = [QUESTION + "\n", "/reset\n", QUESTION + "\n", "/exit\n", "never read\n"]
    history = chat.chat_loop(model, tokenizer, lines, out, system="Be brief.", max_new_tokens=16)
    assert history[0] == {"role": "system", "content": "Be brief."}
    assert [message["role"] for message in history] == ["system", "user", "assistant"]
    assert out.getvalue().count("\n") == 2


def test_chat_cli_one_shot_writes_the_answer(chat_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chat.main(["--model", str(chat_model_dir), "--prompt", QUESTION, "--max_new_tokens", "16"])
    assert capsys.readouterr().out == ANSWER + "\n"


def test_chat_logs_leave_stdout_to_the_answer() -> None:
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    try:
        chat.send_logs_to_stderr()
        assert handler.stream is sys.stderr
    finally:
        logging.getLogger().removeHandler(handler)


def test_chat_cli_refuses_bad_decoding_settings(chat_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        chat.main(["--model", str(chat_model_dir), "--prompt", QUESTION, "--temperature", "-1"])


# --- compare ---------------------------------------------------------------------------------


def test_compare_one_answer_per_prompt_and_model(chat_model_dir: Path, base_dir: Path, adapter_dir: Path) -> None:
    prompts = [QUESTION, "Say something."]
    models = [(str(chat_model_dir), None), (str(base_dir), str(adapter_dir)), (str(base_dir), None)]
    answers = compare.compare(models, prompts, max_new_tokens=8)

    assert len(answers) == len(prompts)
    assert all(len(row) == len(models) and all(isinstance(a, str) for a in row) for row in answers)
    assert answers[0][0] == f"{ANSWER} {IM_END}"  # ended its turn
    assert answers[1][2].endswith("[cut off after 8 tokens: no end of turn]")  # the random base rambles on


def test_compare_cli_writes_a_markdown_table(
    chat_model_dir: Path, base_dir: Path, adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Say something.\n\nName a colour.\n")
    output = tmp_path / "table.md"
    compare.main(
        [
            "--models", str(chat_model_dir), str(base_dir),
            "--adapters", f"{base_dir}:{adapter_dir}",
            "--prompts", QUESTION,
            "--prompts_file", str(prompts_file),
            "--max_new_tokens", "8",
            "--output", str(output),
        ]
    )  # fmt: skip

    table = capsys.readouterr().out
    assert output.read_text() == table
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, separator, one row per prompt
    assert all(unescaped_pipes(line) == 3 + 2 for line in lines)  # prompt column + 3 models
    assert lines[0] == f"| prompt | {chat_model_dir} | {base_dir} | {base_dir} + {adapter_dir} |"
    assert lines[2].startswith(f"| {QUESTION} | {ANSWER} {compare.markdown_cell(IM_END)} |")
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| Say something.", "| Name a colour."]


def test_compare_rejects_a_malformed_adapter_spec() -> None:
    with pytest.raises(ConfigError, match="BASE_DIR:ADAPTER_DIR"):
        compare.parse_adapter_spec("only-one-dir")
