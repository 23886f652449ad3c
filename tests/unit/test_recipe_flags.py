"""The replaced happy-llm recipe's flags: renamed ones warn and land in the new field, others are refused.

Parsing only (no training): each case builds the stage's dataclasses from an argv, as the entry points do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llmtrain.config.parser import REPLACED_FLAGS, parse_args, resolved_config
from llmtrain.config.secrets import redact_secrets
from llmtrain.errors import ConfigError
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.stages import PRETRAIN, SFT

TINY = str(TINY_MODEL_DIR)


def parse(argv: list[str], stage=PRETRAIN):
    """``argv`` parsed for ``stage`` on CPU (where a bf16 run must say so); a run YAML stays first."""
    config = argv[:1] if argv and argv[0].endswith(".yaml") else []
    return parse_args(stage.dataclass_types(), [*config, "--use_cpu", *argv[len(config) :]])


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("llmtrain")]


@pytest.mark.parametrize(
    ("stage", "argv", "new", "read", "expected"),
    [
        (PRETRAIN, ["--evaluation_strategy", "no"], "eval_strategy", lambda a: a[-1].eval_strategy, "no"),
        (PRETRAIN, ["--tokenizer_name", TINY], "tokenizer_name_or_path", lambda a: a[0].tokenizer_name_or_path, TINY),
        (PRETRAIN, ["--torch_dtype", "bfloat16"], "dtype", lambda a: a[0].dtype, "bfloat16"),
        (PRETRAIN, ["--torch_dtype=torch.float16"], "dtype", lambda a: a[0].dtype, "float16"),  # torch's spelling
        (PRETRAIN, ["--gradient_checkpointing"], "activation_checkpointing", lambda a: a[-1].activation_checkpointing,
         True),
        (SFT, ["--block_size", "512"], "max_seq_length", lambda a: a[1].max_seq_length, 512),
    ],
    ids=["evaluation_strategy", "tokenizer_name", "torch_dtype", "torch_dtype-torch-spelling", "gradient_checkpointing",
         "sft-block_size"],
)  # fmt: skip
def test_a_renamed_recipe_flag_sets_the_new_field_and_warns_once(
    stage, argv: list[str], new: str, read, expected, caplog: pytest.LogCaptureFixture
) -> None:
    old = argv[0][2:].partition("=")[0]
    args = parse(argv, stage)
    assert read(args) == expected
    assert warnings_of(caplog) == [f"--{old} is deprecated (happy-llm recipe flag): use --{new}"]
    assert old not in resolved_config(*args)  # the run records the new name only


def test_block_size_is_pretrainings_own_field(caplog: pytest.LogCaptureFixture) -> None:
    _, data, _ = parse(["--block_size", "64"])
    assert data.block_size == 64 and warnings_of(caplog) == []


def test_logging_dir_is_accepted_and_ignored_saying_where_logs_go(tmp_path: Path, caplog) -> None:
    *_, train = parse(["--logging_dir", str(tmp_path / "logs"), "--seed", "7"])
    assert train.seed == 7  # the flag's value was not taken for anything else
    (warning,) = warnings_of(caplog)
    assert warning.startswith("--logging_dir is ignored") and "--swanlab_log_dir" in warning
    assert "<output_dir>/logs" in warning


@pytest.mark.parametrize(
    ("argv", "instead"),
    [
        (["--resume_from_checkpoint", "out/checkpoint-20"], "resume is automatic"),
        (["--overwrite_output_dir"], "--start_over"),
        (["--use_auth_token", "hf_SECRET"], "HF_TOKEN"),
    ],
    ids=["resume_from_checkpoint", "overwrite_output_dir", "use_auth_token"],
)
def test_a_recipe_flag_without_a_counterpart_is_refused_saying_what_to_do(argv: list[str], instead: str) -> None:
    with pytest.raises(ConfigError, match=f"{argv[0]} is not supported .*{instead}") as error:
        parse(argv)
    assert "hf_SECRET" not in str(error.value)


def test_old_and_new_spelling_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--evaluation_strategy and --eval_strategy set the same field"):
        parse(["--evaluation_strategy", "no", "--eval-strategy", "steps"])


def test_yaml_keys_with_the_recipes_names_map_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: 3\ntokenizer_name: {TINY}\ntorch_dtype: bfloat16\nlogging_dir: logs\n")
    model, _, train = parse([str(config)])
    assert (model.tokenizer_name_or_path, model.dtype, train.seed) == (TINY, "bfloat16", 3)
    assert warnings_of(caplog)[:2] == [
        f"{config}:2: 'tokenizer_name' is deprecated (happy-llm recipe key): use 'tokenizer_name_or_path'",
        f"{config}:3: 'torch_dtype' is deprecated (happy-llm recipe key): use 'dtype'",
    ]
    assert warnings_of(caplog)[2].startswith(f"{config}:4: 'logging_dir' is ignored")


def test_yaml_with_both_spellings_is_an_error_but_the_cli_may_override_an_old_yaml_key(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("torch_dtype: bfloat16\ndtype: float32\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: 'torch_dtype' and 'dtype' set the same field"):
        parse([str(config)])
    config.write_text("torch_dtype: bfloat16\n")
    model, _, _ = parse([str(config), "--dtype", "float32"])  # CLI beats YAML, as for any key
    assert model.dtype == "float32"


def test_a_yaml_null_for_a_refused_key_is_unset_as_a_saved_run_config_writes_it(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("resume_from_checkpoint: null\n")
    parse([str(config)])
    config.write_text("resume_from_checkpoint: out/checkpoint-4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: 'resume_from_checkpoint' is not supported"):
        parse([str(config)])


@pytest.mark.parametrize(
    ("argv", "expected"), [(["--bf16"], True), (["--bf16", "--seed", "1"], True), (["--bf16", "false"], False)]
)
def test_a_bare_bf16_means_true(argv: list[str], expected: bool) -> None:
    *_, train = parse(argv)
    assert train.bf16 is expected


@pytest.mark.parametrize(
    ("flag", "candidates"),
    [
        ("--tokenizer", "--tokenizer_name_or_path"),  # argparse used to take it as an abbreviation
        ("--learning", "--learning_rate"),
        ("--learnig_rate", "--learning_rate"),
        ("--swanlab_log", "--swanlab_log_dir"),
    ],
)
def test_an_abbreviated_or_misspelt_flag_is_refused_naming_the_flags_it_is_close_to(flag: str, candidates: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown argument\\(s\\): {flag} x; did you mean {candidates}\\?$"):
        parse([flag, "x"])


def test_an_unknown_yaml_key_names_the_close_ones(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("seed: 1\nlearnig_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: unknown key 'learnig_rate'; did you mean 'learning_rate'\?"):
        parse([str(config)])


def test_the_tokenizer_path_is_logged_under_its_new_name_and_not_hidden(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llmtrain.config.parser")
    config = tmp_path / "run.yaml"
    config.write_text("seed: 1\n")
    parse([str(config), "--tokenizer_name", TINY])
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run config:")]
    assert line.endswith(f"(CLI overrides: --use_cpu --tokenizer_name_or_path {TINY})")
    assert redact_secrets(["--tokenizer_name", TINY]) == ["--tokenizer_name", TINY]
    assert redact_secrets(["--hub-token", "hf_x"]) == ["--hub-token", "***"]  # the hyphen spelling is a secret too
    with pytest.raises(ConfigError, match=r"^--hub-token is not supported .*HF_TOKEN"):  # and refused as one
        parse(["--hub-token", "hf_x"])


def test_the_recipes_own_pretrain_and_finetune_commands_parse(tmp_path: Path) -> None:
    shared = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4", "--do_train",
              "--output_dir", str(tmp_path), "--evaluation_strategy", "no", "--learning_rate", "1e-4",
              "--num_train_epochs", "1", "--warmup_steps", "200", "--logging_dir", str(tmp_path / "logs"),
              "--logging_strategy", "steps", "--logging_steps", "5", "--save_strategy", "steps", "--save_steps", "100",
              "--save_total_limit", "1", "--seed", "12", "--block_size", "2048", "--bf16", "--gradient_checkpointing",
              "--report_to", "swanlab"]  # fmt: skip
    model, data, train = parse(["--config_name", TINY, "--tokenizer_name", TINY, "--train_files", "c.jsonl", *shared])
    assert (data.block_size, train.bf16, train.activation_checkpointing, train.use_swanlab) == (2048, True, True, True)
    sft_args = parse(["--model_name_or_path", TINY, "--train_files", "c.jsonl", *shared], SFT)
    assert (sft_args[1].max_seq_length, sft_args[-1].learning_rate) == (2048, 1e-4)
    assert set(REPLACED_FLAGS) & set(resolved_config(*sft_args)) == set()
    assert set(REPLACED_FLAGS) & set(resolved_config(model, data, train)) == {"block_size"}  # pretraining's own
