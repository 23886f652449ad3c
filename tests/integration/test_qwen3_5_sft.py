"""A tiny published-layout Qwen3.5 through the entry points, as a user brings one: SFT full and LoRA, pretraining.

SFT runs the shipped tiny configs (``configs/sft_tiny_full.yaml``, ``configs/sft_tiny_lora.yaml``) on
a tiny ``Qwen3_5ForConditionalGeneration`` built from transformers' classes (three Gated DeltaNet
layers, one gated attention layer, a vision tower, ``mtp.*`` weights) with multi-turn reasoning
data. Required: packing asked for but no kernels to pack linear attention exactly on this CPU, so
the run trains per-conversation rows and says so; its first logged loss equals the loss of the
same rows each run alone; the outputs come back in the base's published layout and serve through
the published class, the chat/compare tools and merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from llmtrain.config.arguments import ModelArguments
from llmtrain.data.collate import PaddingCollator
from llmtrain.data.sft import load_sft_rows
from llmtrain.modeling import build_model, load_model_config, load_tokenizer_for
from llmtrain.multimodal import checkpoint_tensor_names
from llmtrain.run.ledger import LEDGER_DIR
from llmtrain.tools import compare, merge

from ..conftest import (
    REPO_ROOT,
    TINY_HYBRID_TEXT,
    reasoning_conversations,
    save_random_tiny_qwen3_5_model,
    served_entry,
    train_log,
    write_jsonl,
)

pytestmark = pytest.mark.slow

PROMPT = "What is 3 plus 3?"


SHARED_QWEN3_TOKENIZER = REPO_ROOT.parent / "shared" / "qwen3-tokenizer"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny tokenizer with its think template (always there)."""
    tmp_path = tmp_path_factory.mktemp("qwen3_5")
    data = write_jsonl(tmp_path / "chat.jsonl", reasoning_conversations(64))
    return save_random_tiny_qwen3_5_model(tmp_path / "base"), data


@pytest.fixture(scope="module")
def real_template_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The Qwen3 vocabulary with the official Qwen3.5 think template (../shared)."""
    if not SHARED_QWEN3_TOKENIZER.is_dir():
        pytest.skip("../shared/qwen3-tokenizer absent")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_QWEN3_TOKENIZER)
    tokenizer.chat_template = (SHARED_QWEN3_TOKENIZER / "templates" / "qwen3_5_think.jinja").read_text()
    tmp_path = tmp_path_factory.mktemp("qwen3_5-real-template")
    data = write_jsonl(tmp_path / "chat.jsonl", reasoning_conversations(32))
    return save_random_tiny_qwen3_5_model(tmp_path / "base", tokenizer=tokenizer), data


def finetune(config: str, base: Path, data: Path, tmp_path: Path, *extra: str) -> tuple[Path, str]:
    output_dir = tmp_path / "out"
    result = served_entry(
        [str(REPO_ROOT / "configs" / config), "--model_name_or_path", str(base), "--train_files", str(data),
         "--output_dir", str(output_dir), "--tokenized_path", str(tmp_path / "tokenized"), "--max_steps", "3",
         "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
         "--validation_split_percentage", "0", "--disable_tqdm", "true", *extra],
        tmp_path, entry="finetune.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output_dir, result.stdout + result.stderr


def first_step_reference_loss(base: Path, output_dir: Path, tokenized: Path) -> float:
    """The first step's rows (from the ledger), each run alone through the untrained model: token-weighted mean."""
    rows, _ = load_sft_rows(tokenized)
    first = json.loads((output_dir / LEDGER_DIR / "rank-0.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and len(first["samples"]) == 1
    args = ModelArguments(model_name_or_path=str(base))
    model = build_model(args, load_model_config(args), load_tokenizer_for(args)).train()
    total, count = 0.0, 0
    with torch.no_grad():
        for index in first["samples"][0]:
            row = rows.row(index)
            supervised = sum(label != -100 for label in row["labels"][1:])
            total += model(**PaddingCollator(0)([row])).loss.item() * supervised
            count += supervised
    return total / count


def assert_published_layout(output_dir: Path, base: Path) -> None:
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert set(checkpoint_tensor_names(output_dir)) == set(checkpoint_tensor_names(base))
    served = AutoModelForImageTextToText.from_pretrained(output_dir)
    text = AutoModelForCausalLM.from_pretrained(output_dir)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(input_ids=ids).logits, text.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("template", ["tiny-think", "qwen3_5_think.jinja"])
def test_full_sft_trains_conversations_apart_and_keeps_the_published_layout(
    template: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, data = request.getfixturevalue("inputs" if template == "tiny-think" else "real_template_inputs")
    steps = "3" if template == "tiny-think" else "1"  # the real vocabulary's 151k logits cost time on a CPU
    output_dir, log = finetune("sft_tiny_full.yaml", base, data, tmp_path, "--max_steps", steps)
    assert "packing: 3 of 4 layers are linear_attention" in log and "flash-linear-attention" in log
    assert "MISSING" not in log
    manifest = json.loads((output_dir / "run_manifest.json").read_text())
    assert manifest["data"]["sequence_layout"]["name"] == "padded"
    first_loss = train_log(output_dir)[0]
    assert first_loss["step"] == 1
    reference = first_step_reference_loss(base, output_dir, tmp_path / "tokenized")
    assert abs(first_loss["loss"] - reference) / reference < 1e-5, (first_loss["loss"], reference)
    assert_published_layout(output_dir, base)

    compare.main(["--models", str(base), str(output_dir), "--prompts", PROMPT, "--max_new_tokens", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| What")]
    assert len(rows) == 1 and rows[0].count("|") >= 4


def test_lora_sft_writes_an_adapter_for_the_published_class_that_merges_into_its_layout(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, data = inputs
    output_dir, log = finetune("sft_tiny_lora.yaml", base, data, tmp_path)
    assert "linear-attention layers get no adapter" not in log
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert {"in_proj_qkv", "in_proj_z", "out_proj"} <= set(config["target_modules"])
    assert not {"in_proj_a", "in_proj_b"} & set(config["target_modules"])
    compare.main(["--adapters", f"{base}:{output_dir}", "--prompts", PROMPT, "--max_new_tokens", "8"])
    assert any(line.startswith("| What") for line in capsys.readouterr().out.splitlines())
    merge.merge_adapter(output_dir, tmp_path / "merged")
    assert_published_layout(tmp_path / "merged", base)


def test_a_hybrid_config_pretrains_from_scratch(tmp_path: Path) -> None:
    from transformers import Qwen3_5TextConfig

    from llmtrain.paths import TINY_MODEL_DIR

    config_dir = tmp_path / "config"
    Qwen3_5TextConfig(**TINY_HYBRID_TEXT, vocab_size=4096).save_pretrained(config_dir)
    result = served_entry(
        ["--config_name", str(config_dir), "--tokenizer_name_or_path", str(TINY_MODEL_DIR),
         "--output_dir", str(tmp_path / "out"), "--block_size", "64", "--max_steps", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    losses = [entry["loss"] for entry in train_log(tmp_path / "out") if "loss" in entry]
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert model.config.layer_types.count("linear_attention") == 3
