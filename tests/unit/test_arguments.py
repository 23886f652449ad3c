"""YAML + CLI parsing: precedence, unknown keys, cross-field rules, shipped configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llmtrain.config.arguments import (
    FinetuneArguments,
    ModelArguments,
    PretrainDataArguments,
    SFTDataArguments,
    TrainArguments,
)
from llmtrain.config.parser import parse_args, resolved_config
from llmtrain.config.secrets import is_secret_key
from llmtrain.errors import ConfigError
from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE_TYPES = (ModelArguments, PretrainDataArguments, TrainArguments)


def parse(argv: list[str], default_config: Path | None = None):
    return parse_args(STAGE_TYPES, argv, default_config)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_cli_overrides_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "learning_rate: 1.0e-4\nblock_size: 64\noutput_dir: out-yaml\n")
    _, data, train = parse([str(config), "--learning_rate", "3.0e-4"])
    assert train.learning_rate == pytest.approx(3.0e-4)  # CLI beats YAML
    assert data.block_size == 64  # YAML beats the dataclass default (1024)
    assert train.output_dir == "out-yaml"
    assert train.weight_decay == 0.0  # untouched default


def test_yaml_lists_and_booleans_become_fields(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "train_files: [a.jsonl, b.txt]\nactivation_checkpointing: true\n")
    _, data, train = parse([str(config)])
    assert data.train_files == ["a.jsonl", "b.txt"]
    assert train.activation_checkpointing is True


def test_unknown_yaml_key_is_an_error_naming_key_and_line(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "learning_rate: 1.0e-4\nlearnig_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: unknown key 'learnig_rate'"):
        parse([str(config)])


def test_unknown_cli_flag_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--not_a_field"):
        parse(["--not_a_field", "1"])


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        parse([str(tmp_path / "nope.yaml")])


def test_config_name_and_model_name_or_path_are_mutually_exclusive() -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse(["--config_name", "a", "--model_name_or_path", "b"])


def test_no_model_means_the_embedded_tiny_default() -> None:
    model, data, _ = parse([])
    assert model.config_name == str(TINY_MODEL_DIR)
    assert model.tokenizer_name_or_path == str(TINY_MODEL_DIR)
    assert model.trust_remote_code is False
    assert data.train_files == [str(DEMO_CORPUS_PATH)]


def test_tokenizer_defaults_to_the_pretrained_model_and_is_required_for_a_config_file(tmp_path: Path) -> None:
    model, _, _ = parse(["--model_name_or_path", "some/model"])
    assert model.tokenizer_name_or_path == "some/model"
    assert model.from_scratch is False
    config_file = tmp_path / "config.json"
    config_file.write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer_name_or_path is required"):
        parse(["--config_name", str(config_file)])


def test_report_to_swanlab_is_routed_away_from_transformers_integration() -> None:
    _, _, train = parse(["--report_to", "swanlab", "--output_dir", "o"])
    assert train.use_swanlab is True
    assert "swanlab" not in train.report_to
    assert train.swanlab_log_dir == "o/swanlog"


def test_bf16_is_off_on_cpu_unless_asked() -> None:
    _, _, train = parse(["--use_cpu", "true"])
    assert train.bf16 is False


def test_block_size_and_split_rules_live_in_post_init() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        parse(["--block_size", "1"])
    with pytest.raises(ConfigError, match="validation_split_percentage"):
        parse(["--validation_split_percentage", "60"])
    with pytest.raises(ConfigError, match="prepare_only needs tokenized_path"):
        parse(["--prepare_only", "true"])


@pytest.mark.parametrize("argv", [["--max_steps", "0"], ["--num_train_epochs", "0"]], ids=["max-steps", "epochs"])
def test_a_run_that_would_train_nothing_is_a_config_error(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="trains nothing"):
        parse(argv)


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config: Path) -> None:
    if config.name.startswith("sft_"):
        model, data, method, train = parse_args(
            (ModelArguments, SFTDataArguments, FinetuneArguments, TrainArguments), [str(config), "--use_cpu", "true"]
        )
        assert data.max_seq_length >= 8 and method.finetuning_type in ("full", "lora")
        assert model.model_name_or_path, "SFT starts from pretrained weights"
    else:
        model, data, train = parse([str(config), "--use_cpu", "true"])
        assert data.block_size >= 2
    assert train.output_dir
    assert model.trust_remote_code is False


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_knob_in_shipped_configs_has_a_why_comment(config: Path) -> None:
    for number, line in enumerate(config.read_text().splitlines(), start=1):
        if line and not line.startswith((" ", "#", "-")) and ":" in line:
            assert "#" in line, f"{config.name}:{number} has no why-comment: {line}"


def test_tiny_yaml_is_what_runs_with_no_config() -> None:
    default_config = REPO_ROOT / "configs" / "pretrain_tiny.yaml"
    assert resolved_config(*parse([], default_config)) == resolved_config(*parse([str(default_config)]))


def with_hub_token(parsed: tuple) -> tuple:
    """``parsed`` with a hub token set as a library could set it (no flag or key can: they are refused)."""
    parsed[-1].hub_token = "hf_SECRET"
    return parsed


def test_resolved_config_round_trips_and_holds_no_secrets(tmp_path: Path) -> None:
    argv = ["--learning_rate", "2.0e-4", "--train_files", "x.jsonl", "y.jsonl"]
    first = resolved_config(*with_hub_token(parse(argv)))
    assert "hub_token" not in first
    assert "hf_SECRET" not in yaml.safe_dump(first)
    saved = write_yaml(tmp_path, yaml.safe_dump({k: v for k, v in first.items() if k != "local_rank"}))
    second = resolved_config(*parse([str(saved)]))
    assert second == first


def test_pickled_training_args_carry_no_secret() -> None:
    import pickle

    _, _, train = with_hub_token(parse(["--use_cpu", "true"]))
    assert train.hub_token == "hf_SECRET"  # still usable in this process
    assert b"hf_SECRET" not in pickle.dumps(train)
    assert train.dataloader_pin_memory is False


def test_only_credentials_are_secret_keys() -> None:
    import dataclasses

    every_field = {
        spec.name
        for types in (STAGE_TYPES, (SFTDataArguments, FinetuneArguments))
        for cls in types
        for spec in dataclasses.fields(cls)
    }
    assert {name for name in every_field if is_secret_key(name)} == {"hub_token"}
    # so the settings whose names merely contain "token" are saved with the run like any other
    config = resolved_config(*with_hub_token(parse(["--tokenized_path", "/data/tok"])))
    assert config["tokenized_path"] == "/data/tok" and "average_tokens_across_devices" in config
    assert "hub_token" not in config


@pytest.mark.parametrize(
    ("given", "variable"),
    [
        (["--hub_token", "hf_SECRET"], "HF_TOKEN"),
        (["--hub_token=hf_SECRET"], "HF_TOKEN"),
        (["--hub-token", "hf_SECRET"], "HF_TOKEN"),
        (["--hub-token=hf_SECRET"], "HF_TOKEN"),
        (["--swanlab_api_key", "hf_SECRET"], "SWANLAB_API_KEY"),  # no such field: refused, not "unknown"
    ],
    ids=["separate-value", "equals-sign", "hyphens", "hyphens-equals-sign", "swanlab-key"],
)
def test_run_cli_refuses_a_secret_flag_naming_the_variable_to_set(
    given: list[str], variable: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from llmtrain.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--seed", "3", *given])
    reached: list[str] = []

    def main(argv: list[str]) -> None:
        parse(argv)
        reached.append("past the parser")

    assert run_cli(main) == 2
    assert not reached
    (error,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    flag = given[0].partition("=")[0]
    assert error.startswith(f"{flag} is not supported (a credential never goes in a flag")
    assert f"set the {variable} environment variable instead" in error and "hf_SECRET" not in caplog.text


def test_a_secret_key_in_a_run_config_is_refused_with_its_line(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "seed: 3\nhub_token: hf_SECRET\n")
    with pytest.raises(ConfigError) as refused:
        parse([str(config), "--seed", "4"])
    assert str(refused.value).startswith(f"{config}:2: 'hub_token' is not supported (a credential never goes in")
    assert "set the HF_TOKEN environment variable instead" in str(refused.value)
    assert "hf_SECRET" not in str(refused.value)


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_a_shipped_configs_usage_lines_name_that_config(config: Path) -> None:
    usage = [line for line in config.read_text().splitlines() if line.startswith("#") and ".sh configs/" in line]
    named = {word for line in usage for word in line.split()}
    named_configs = {word for word in named if word.startswith("configs/") and word.endswith(".yaml")}
    assert named_configs <= {f"configs/{config.name}"}, f"{config.name}'s comments name {named_configs}"
