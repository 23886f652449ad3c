"""DeepSpeed ZeRO-3 on 2 CPU ranks through pretrain.sh: train, checkpoint, SIGKILL, launcher restart, resume.

Under ZeRO-3 every rank holds a slice of each weight; the final model only loads in transformers
because ``ds_config_zero3.json`` gathers the slices on save (``stage3_gather_16bit_weights_on_model_save``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtrain.paths import DEMO_CORPUS_PATH
from llmtrain.run.completeness import checkpoint_problem

from ..conftest import REPO_ROOT, built_once, free_port, launch, read_summary, train_log, wait

pytestmark = pytest.mark.slow

STEPS = 8
KILLED_AFTER = 5  # checkpoint-4 is complete by then; step 5 is lost and redone


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ZeRO-3 run (killed after step 5, resumed by the launcher) that the tests below read, built once."""

    def build(tmp_path: Path) -> tuple[Path, str]:
        output_dir = tmp_path / "out"
        command = [
            "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
            "--dataset_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true", "--report_to", "none",
            "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "4", "--max_steps", str(STEPS),
        ]  # fmt: skip
        env = {
            "NPROC": "2",
            "MASTER_PORT": str(free_port()),
            "DS_CONFIG": str(REPO_ROOT / "ds_config_zero3.json"),
            "LLMTRAIN_FAULT": f"kill_after_step={KILLED_AFTER}",
            "SKIP_DOCTOR": "0",  # the preflight builds the model on the meta device under the ZeRO-3 config too
        }
        output = wait(launch(command, tmp_path, "run.log", **env), tmp_path, "run.log", timeout=600)
        return output_dir, output

    return built_once(tmp_path_factory, "zero3-run", build)


def test_zero3_trains_is_killed_and_the_launcher_resumes_it(zero3_run: tuple[Path, str]) -> None:
    output_dir, output = zero3_run
    assert "doctor: 0 error(s)" in output
    assert f"LLMTRAIN_FAULT=kill_after_step={KILLED_AFTER}: killing this rank now" in output
    assert "launch: exit 247; restart 1/2 resumes from step 4" in output  # 247: DeepSpeed's launcher after SIGKILL
    summary = read_summary(output_dir)
    assert (summary["engine"], summary["zero_stage"], summary["world_size"]) == ("DeepSpeedEngine", 3, 2)
    assert summary["global_step"] == STEPS and summary["resumed_from"] == str(output_dir / "checkpoint-4")
    assert [entry["step"] for entry in train_log(output_dir) if "loss" in entry] == list(range(1, STEPS + 1))


def test_zero3_checkpoints_are_complete_with_every_ranks_shards(zero3_run: tuple[Path, str]) -> None:
    output_dir, _ = zero3_run
    for step in (4, STEPS):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert checkpoint_problem(checkpoint, verify_checksums=True) is None
        marker = json.loads((checkpoint / "llmtrain_complete.json").read_text())
        assert (marker["global_step"], marker["world_size"]) == (step, 2)
        assert {f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= set(
            marker["files"]
        )
        assert "model.safetensors" in marker["files"]  # gathered at every save, not only the final one


def test_the_final_model_loads_whole_and_holds_the_trained_weights(zero3_run: tuple[Path, str]) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output_dir, _ = zero3_run
    assert not (output_dir / ".final-partial").exists() and not list(output_dir.glob("global_step*"))
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(output_dir))
    saved = model.state_dict()
    assert {name: tuple(t.shape) for name, t in saved.items()} == {
        name: tuple(t.shape) for name, t in initial.state_dict().items()
    }
    assert all(tensor.numel() > 0 for tensor in load_file(output_dir / "model.safetensors").values())
    # The gathered weights are the optimizer's fp32 master weights of the last step, on every rank's slice.
    masters = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / f"checkpoint-{STEPS}"))
    assert masters.keys() <= saved.keys() and len(masters) >= len(saved) - 1  # the tied lm_head is not stored twice
    for name, master in masters.items():
        assert torch.equal(saved[name], master), name
    # ... and they are trained: the corpus is likelier under them than under freshly initialised weights.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    text = " ".join(json.loads(line)["text"] for line in DEMO_CORPUS_PATH.read_text().splitlines()[:4])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        trained_loss = model(input_ids=ids, labels=ids).loss.item()
        initial_loss = initial(input_ids=ids, labels=ids).loss.item()
    assert trained_loss < initial_loss - 0.2, (trained_loss, initial_loss)
