"""Real SFT launches through finetune.sh: 2 CPU ranks, DeepSpeed ZeRO-2, LoRA and full, SIGKILL + resume.

The resume test trains a tiny Qwen3 (q/k norm, a think template that is not prefix-stable) with LoRA on
multi-turn reasoning data, then merges the adapter and chats with the result, as a Qwen3 user would.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..conftest import (
    REPO_ROOT,
    free_port,
    kill_every_rank,
    launch,
    qa_conversations,
    read_summary,
    reasoning_conversations,
    save_random_tiny_model,
    save_random_tiny_qwen3_5_model,
    save_random_tiny_qwen3_model,
    subprocess_env,
    train_log,
    wait,
    wait_for_checkpoint,
    write_jsonl,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("sft-inputs")
    base = save_random_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "belle.jsonl", qa_conversations(240))
    return base, data


def finetune_command(base: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "bash", str(REPO_ROOT / "finetune.sh"),
        "--model_name_or_path", str(base), "--train_files", str(data), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--max_seq_length", "128",
        "--per_device_train_batch_size", "2", "--disable_tqdm", "true", "--logging_steps", "2",
        "--eval_steps", "6", "--save_steps", "6", "--report_to", "none", *extra,
    ]  # fmt: skip


def run_two_ranks(command: list[str], tmp_path: Path) -> str:
    process = launch(command, tmp_path, "run.log", NPROC="2", MASTER_PORT=str(free_port()))
    return wait(process, tmp_path, "run.log")


def test_lora_sft_on_two_ranks_changes_only_the_adapter(sft_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = sft_inputs
    output_dir = tmp_path / "lora"
    run_two_ranks(finetune_command(base, data, output_dir, "--max_steps", "12", "--finetuning_type", "lora"), tmp_path)
    summary = read_summary(output_dir)
    assert (summary["engine"], summary["zero_stage"], summary["world_size"]) == ("DeepSpeedEngine", 2, 2)
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "model.safetensors").exists()
    assert (output_dir / "chat_template.jinja").is_file() or "chat_template" in (
        output_dir / "tokenizer_config.json"
    ).read_text()

    adapter = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b), "LoRA B starts at zero and must have moved"
    base_weights = load_file(base / "model.safetensors")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output_dir)
    for name, parameter in tuned.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(parameter, base_weights[key]), f"base weight {key} changed under LoRA"
    losses = [entry["loss"] for entry in train_log(output_dir) if "loss" in entry]
    assert losses[-1] < losses[0]


def test_full_sft_on_two_ranks_updates_the_weights(sft_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = sft_inputs
    output_dir = tmp_path / "full"
    umask = os.umask(0o022)  # the launch inherits it: the common default, under which files are 0644
    try:
        command = finetune_command(base, data, output_dir, "--max_steps", "6", "--finetuning_type", "full")
        run_two_ranks(command, tmp_path)
    finally:
        os.umask(umask)
    summary = read_summary(output_dir)
    assert (summary["engine"], summary["zero_stage"], summary["world_size"]) == ("DeepSpeedEngine", 2, 2)
    tuned = load_file(output_dir / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in original  # tied to embed_tokens: save_pretrained writes it once
    assert tuned.keys() == original.keys() == load_file(output_dir / "checkpoint-6" / "model.safetensors").keys()
    assert any(not torch.equal(tuned[key], original[key]) for key in original)
    assert not (output_dir / "adapter_config.json").exists()
    for path in (output_dir / "model.safetensors", output_dir / "checkpoint-6" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path} must be readable like any save_pretrained file"
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.eos_token_id,
    ]


def test_qwen3_lora_on_reasoning_data_resumes_after_sigkill_then_merges_and_chats(tmp_path: Path) -> None:
    base = save_random_tiny_qwen3_model(tmp_path / "qwen3-base")
    data = write_jsonl(tmp_path / "reasoning.jsonl", reasoning_conversations(240))
    output_dir = tmp_path / "resume"
    command = finetune_command(base, data, output_dir, "--max_steps", "30", "--finetuning_type", "lora")
    env = {"NPROC": "2", "MASTER_PORT": str(free_port())}
    first = launch(command, tmp_path, "first.log", **env)
    wait_for_checkpoint(first, output_dir / "checkpoint-6", tmp_path / "first.log")
    kill_every_rank(first)
    assert not (output_dir / "train_summary.json").exists(), "the run finished before it could be killed"
    first_log = (tmp_path / "first.log").read_text(errors="replace")
    expanded = re.search(r"(\d+) conversation\(s\) rendered earlier assistant turns differently as history", first_log)
    assert expanded and int(expanded[1]) > 100, "two-answer conversations train their first answer in a row of its own"
    assert "[[<think>\n" in first_log, "the reasoning is supervised, inside the think block the template renders"

    env["MASTER_PORT"] = str(free_port())
    output = wait(launch(command, tmp_path, "second.log", **env), tmp_path, "second.log")
    summary = read_summary(output_dir)
    assert summary["global_step"] == 30 and summary["resumed_from"] is not None
    assert "resuming from" in output
    assert [e["step"] for e in train_log(output_dir) if "loss" in e] == list(range(2, 31, 2))
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"

    merged = tmp_path / "merged"
    tools_env = subprocess_env(tmp_path)
    merge = subprocess.run([sys.executable, "-m", "llmtrain.tools.merge", "--adapter", str(output_dir),
                            "--output", str(merged)], cwd=REPO_ROOT, env=tools_env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert merge.returncode == 0, merge.stdout[-3000:] + merge.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "qwen3"
    assert (merged / "run_manifest.json").is_file(), "the merged model says what trained it"
    chat = subprocess.run([sys.executable, "-m", "llmtrain.tools.chat", "--model", str(merged), "--prompt",
                           "What is 7 plus 7?", "--max_new_tokens", "24"], cwd=REPO_ROOT, env=tools_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert chat.returncode == 0, chat.stdout[-3000:] + chat.stderr[-3000:]
    assert chat.stdout.strip(), "the merged Qwen3 model answers"


def test_qwen3_5_full_sft_on_two_ranks_resumes_bit_identically_after_sigkill(tmp_path: Path) -> None:
    """A tiny published-layout Qwen3.5 (hybrid, multimodal) under ZeRO-2 on 2 ranks: every rank SIGKILLed after
    step 3, the launcher's restart resumes from checkpoint-2; losses, final weights (published layout, vision
    tower and mtp included) and data order equal an uninterrupted run's, bit for bit (verify_resume)."""
    base = save_random_tiny_qwen3_5_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "reasoning.jsonl", reasoning_conversations(48))
    command = [
        sys.executable, "-m", "llmtrain.tools.verify_resume", "sft", str(REPO_ROOT / "configs" / "sft_tiny_full.yaml"),
        "--steps", "5", "--kill_after", "3", "--save_every", "2", "--workdir", str(tmp_path / "verify"),
        "--model_name_or_path", str(base), "--train_files", str(data), "--validation_split_percentage", "0",
        "--per_device_train_batch_size", "2",
    ]  # fmt: skip
    env = subprocess_env(tmp_path, NPROC="2", MASTER_PORT=str(free_port()))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "verify_resume: identical" in result.stdout + result.stderr
    resumed = tmp_path / "verify" / "resumed"
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert (summary["engine"], summary["zero_stage"], summary["world_size"]) == ("DeepSpeedEngine", 2, 2)
    assert summary["global_step"] == 5 and summary["resumed_from"] is not None
    config = json.loads((resumed / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "vision_config" in config
    assert (resumed / "model.safetensors.index.json").is_file()
