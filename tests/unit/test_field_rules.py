"""Field rules (``llmtrain.config.arguments``, "Field rules"): every field declares one, and the sets derive from them.

The literal sets below are the lists the project kept by hand before the rules moved onto the
fields (issue 25), copied once: deriving them must not have moved any field between sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer, TrainingArguments

from llmtrain.config.arguments import (
    ARGUMENT_DATACLASSES,
    RESUME_KINDS,
    TRAINING_ARGUMENT_RULES,
    FinetuneArguments,
    PretrainDataArguments,
    SFTDataArguments,
    TrainArguments,
    field_rules,
    prepared_settings,
    stage_data_settings,
)
from llmtrain.data.sft import preparation_compat, sft_code_version, template_fingerprint
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.run.output_dir import STRUCTURAL_KEYS, VOLATILE_KEYS

LISTED_VOLATILE_KEYS = {
    "start_over", "allow_data_change", "local_rank", "report_to", "logging_steps", "logging_first_step",
    "logging_strategy", "save_steps", "save_strategy", "save_total_limit", "eval_steps", "dataloader_num_workers",
    "ddp_timeout", "deepspeed", "use_cpu", "disable_tqdm", "log_level", "log_level_replica",
    "swanlab_project", "swanlab_experiment_name", "swanlab_mode", "swanlab_log_dir",
    "prepare_only", "preprocessing_num_workers", "tokenized_path", "dataset_cache_dir", "run_name",
    "checkpoint_checksums",
}  # fmt: skip
LISTED_STRUCTURAL_KEYS = {
    "model_name_or_path", "config_name", "tokenizer_name_or_path", "finetuning_type", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "layers_to_transform", "trainable_last_n_layers", "train_final_norm",
    "train_lm_head",
}  # fmt: skip
# prepare_sft_data's compat dict, field by field (tokenizer and code_version are not fields).
LISTED_SFT_CACHE_FIELDS = {
    "max_seq_length", "packing", "share_prefixes", "train_on_last_turn_only", "truncation_strategy",
    "default_system_prompt", "end_of_turn_token", "chat_template_kwargs", "invalid_records", "max_invalid_share",
}  # fmt: skip
LISTED_PRETRAIN_SETTINGS = {"text_field", "txt_sample_by"}  # prepare_pretrain_data's settings for the data sources


def undeclared(dataclass_type: type) -> list[str]:
    return [name for name, rule in field_rules(dataclass_type).items() if rule is None]


@pytest.mark.parametrize("dataclass_type", ARGUMENT_DATACLASSES, ids=lambda cls: cls.__name__)
def test_every_field_declares_how_a_resume_treats_it(dataclass_type: type) -> None:
    missing = undeclared(dataclass_type)
    assert not missing, (
        f"{dataclass_type.__name__}: {', '.join(missing)} declare no field rule. Annotate each one, e.g. "
        "`name: Annotated[int, IDENTITY] = field(...)` (STRUCTURAL, DATA, PREPARED, IDENTITY or VOLATILE: see the "
        "'Field rules' section of llmtrain/config/arguments.py); a field transformers' TrainingArguments added "
        "goes in TRAINING_ARGUMENT_RULES"
    )
    for name, rule in field_rules(dataclass_type).items():
        assert rule is not None and rule.resume in RESUME_KINDS, name
        assert rule.cache_key or rule.resume != "data", f"{name}: DATA fields are part of the cache key"


def test_a_new_field_without_a_rule_is_caught() -> None:
    @dataclass
    class WithANewKnob(FinetuneArguments):
        new_knob: int = 1

    assert undeclared(WithANewKnob) == ["new_knob"]


def test_the_transformers_table_names_exactly_the_fields_trainarguments_inherits() -> None:
    inherited = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    ours, theirs = TrainArguments.__dataclass_fields__, TrainingArguments.__dataclass_fields__
    redeclared = {name for name in inherited if ours[name] is not theirs[name]}  # bf16, ddp_timeout: annotated
    assert set(TRAINING_ARGUMENT_RULES) == inherited - redeclared, (
        f"stale: {sorted(set(TRAINING_ARGUMENT_RULES) - inherited)}, "
        f"missing: {sorted(inherited - redeclared - set(TRAINING_ARGUMENT_RULES))}"
    )
    assert all(not rule.cache_key for rule in TRAINING_ARGUMENT_RULES.values())


def test_the_derived_sets_are_the_ones_listed_by_hand_before() -> None:
    assert VOLATILE_KEYS == LISTED_VOLATILE_KEYS
    assert STRUCTURAL_KEYS == LISTED_STRUCTURAL_KEYS
    assert set(prepared_settings(SFTDataArguments())) == LISTED_SFT_CACHE_FIELDS
    assert set(stage_data_settings(PretrainDataArguments())) == LISTED_PRETRAIN_SETTINGS
    assert stage_data_settings(SFTDataArguments()) == {} and prepared_settings(PretrainDataArguments()) == {}


@pytest.mark.parametrize("packed, trees", [(True, False), (False, False), (True, True)])
def test_the_sft_cache_key_parts_are_the_ones_written_out_before(packed: bool, trees: bool) -> None:
    data_args = SFTDataArguments(
        max_seq_length=64, default_system_prompt="Be brief.", chat_template_kwargs='{"enable_thinking": false}'
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    written_out = {
        "max_seq_length": data_args.max_seq_length,
        "packing": packed,
        "share_prefixes": trees,
        "train_on_last_turn_only": data_args.train_on_last_turn_only,
        "truncation_strategy": data_args.truncation_strategy,
        "default_system_prompt": data_args.default_system_prompt,
        "end_of_turn_token": data_args.end_of_turn_token,
        "chat_template_kwargs": data_args.template_kwargs,
        "invalid_records": data_args.invalid_records,
        "max_invalid_share": data_args.max_invalid_share,
        "tokenizer": template_fingerprint(tokenizer),
        "code_version": sft_code_version(),
    }
    assert preparation_compat(data_args, tokenizer, packed, trees) == written_out
