"""Supervised fine-tuning (SFT) of a causal LM on multi-turn conversations, full or LoRA.

    bash finetune.sh [configs/X.yaml] [--key value ...]      # launcher: GPUs, CPU ranks, nodes
    python finetune.py [configs/X.yaml] [--key value ...]    # one process, no DeepSpeed

With no config, configs/sft_tiny_lora.yaml is used: LoRA on the tiny model that
`bash pretrain.sh` wrote to outputs/pretrain-tiny, with the embedded demo conversations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmtrain.arguments import (
    FinetuneArguments,
    ModelArguments,
    SFTDataArguments,
    TrainArguments,
    parse_args,
    resolved_config,
)
from llmtrain.data.sft import PaddingCollator, check_collated_batch, collate_packed, prepare_sft_data
from llmtrain.finetuning import apply_finetuning_method
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

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft_tiny_lora.yaml"
MASK_CHECK_ROWS = 8  # rows collated and checked for labelled padding before training starts


def main(argv: list[str]) -> None:
    """Parse -> tokenizer and model config -> encoded conversations -> model (+LoRA) -> Trainer -> save."""
    disable_unused_cpu_ops()
    model_args, data_args, method_args, training_args = parse_args(
        (ModelArguments, SFTDataArguments, FinetuneArguments, TrainArguments), argv, DEFAULT_CONFIG
    )
    set_rank_log_level(training_args)
    tokenizer = load_tokenizer(model_args)
    model_config = load_model_config(model_args)
    check_sequence_length(data_args.max_seq_length, model_config, "max_seq_length")
    run_config = resolved_config(model_args, data_args, method_args, training_args)
    start = None if data_args.prepare_only else inspect_output_dir(training_args, run_config)
    if start is not None and start.already_finished:
        return
    with training_args.main_process_first(desc="encode conversations"):
        data = prepare_sft_data(data_args, tokenizer)
    collator = collate_packed if data_args.packing else PaddingCollator(tokenizer.pad_token_id)
    check_collated_batch(collator([data.train[i] for i in range(min(MASK_CHECK_ROWS, len(data.train)))]))
    if start is None:
        return
    model = build_model(model_args, model_config, tokenizer, training_args.seed)
    model = apply_finetuning_method(model, method_args, training_args.activation_checkpointing)
    open_output_dir(training_args, run_config, start)
    manifest = run_manifest(run_config, data.path, data.metadata, start.run_id)
    trainer = build_trainer(model, tokenizer, training_args, data.train, data.eval, collator, manifest)
    train_and_save(trainer, start, manifest)


if __name__ == "__main__":
    sys.exit(run_cli(main))
