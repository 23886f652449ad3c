"""Pretrain a Qwen2.5-architecture causal LM on block-grouped text.

    bash pretrain.sh [configs/X.yaml] [--key value ...]      # launcher: GPUs, CPU ranks, nodes
    python pretrain.py [configs/X.yaml] [--key value ...]    # one process, no DeepSpeed

With no config, configs/pretrain_tiny.yaml is used: the embedded tiny model and demo corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmtrain.arguments import DataArguments, ModelArguments, TrainArguments, parse_args, resolved_config
from llmtrain.data.pretrain import collate_blocks, prepare_pretrain_data
from llmtrain.manifest import run_manifest
from llmtrain.modeling import build_model, check_sequence_length, load_model_config, load_tokenizer
from llmtrain.training import (
    build_trainer,
    disable_unused_cpu_ops,
    inspect_output_dir,
    open_output_dir,
    run_cli,
    set_rank_log_level,
    train_and_save,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain_tiny.yaml"


def main(argv: list[str]) -> None:
    """Parse -> tokenizer and model config -> tokenized blocks -> model -> Trainer -> save."""
    disable_unused_cpu_ops()
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, TrainArguments), argv, DEFAULT_CONFIG
    )
    set_rank_log_level(training_args)
    tokenizer = load_tokenizer(model_args)
    model_config = load_model_config(model_args)
    check_sequence_length(data_args.block_size, model_config, "block_size")
    run_config = resolved_config(model_args, data_args, training_args)
    start = None if data_args.prepare_only else inspect_output_dir(training_args, run_config)
    if start is not None and start.already_finished:
        return
    with training_args.main_process_first(desc="tokenize"):
        data = prepare_pretrain_data(data_args, tokenizer)
    if start is None:
        return
    model = build_model(model_args, model_config, tokenizer, training_args.seed)
    open_output_dir(training_args, run_config, start)
    manifest = run_manifest(run_config, data.path, data.metadata, start.run_id)
    trainer = build_trainer(model, tokenizer, training_args, data.train, data.eval, collate_blocks, manifest)
    train_and_save(trainer, start, manifest)


if __name__ == "__main__":
    sys.exit(run_cli(main))
