"""Supervised fine-tuning (SFT) of a causal LM on multi-turn conversations, full or LoRA.

    bash finetune.sh [configs/X.yaml] [--key value ...]      # launcher: GPUs, CPU ranks, nodes
    python finetune.py [configs/X.yaml] [--key value ...]    # one process, no DeepSpeed

With no config, configs/sft_tiny_full.yaml is used: full fine-tuning of the tiny model that
`bash pretrain.sh` wrote to outputs/pretrain-tiny, with the embedded demo conversations.
"""

from __future__ import annotations

import gc
import sys

if __name__ == "__main__":  # imported as a module, it leaves the collector alone
    gc.disable()  # while the training stack is imported: run_cli freezes what it built, then collects again

from llmtrain.cli import run_cli
from llmtrain.config.parser import parse_args, resolved_config
from llmtrain.data.collate import check_collated_batch, check_layout_fits_model, choose_layout, collator_for
from llmtrain.data.sft import prepare_sft_data
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.mixers import recurrent_mixers
from llmtrain.modeling import (
    build_model,
    check_sequence_length,
    load_model_config,
    load_tokenizer_for,
    resolve_attn_implementation,
    stop_at_end_of_turn,
)
from llmtrain.multimodal import MultimodalBase
from llmtrain.run.output_dir import inspect_output_dir
from llmtrain.run.process import disable_unused_cpu_ops, init_deepspeed_comm, set_rank_log_level
from llmtrain.run.train import resume_data_check, train_in_output_dir
from llmtrain.stages import SFT

MASK_CHECK_ROWS = 8  # rows collated and checked for labelled padding before training starts


def main(argv: list[str]) -> None:
    """Parse -> tokenizer and model config -> encoded conversations -> model (+LoRA) -> Trainer -> save."""
    disable_unused_cpu_ops()
    model_args, data_args, method_args, training_args = parse_args(SFT.dataclass_types(), argv, SFT.default_config)
    set_rank_log_level(training_args)
    init_deepspeed_comm(training_args)  # before the model: ZeRO-3 builds it partitioned across the ranks
    tokenizer = load_tokenizer_for(model_args)
    model_config = load_model_config(model_args)
    check_sequence_length(SFT.sequence_length(data_args), model_config, SFT.length_field)
    run_config = resolved_config(model_args, data_args, method_args, training_args)
    start = None if data_args.prepare_only else inspect_output_dir(training_args, run_config)
    if start is not None and start.already_finished:
        return
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    layout = choose_layout(data_args.packing, attn_implementation, model_config, None, data_args.share_prefixes)
    layout.announce()
    with training_args.main_process_first(desc="encode conversations"):
        data = prepare_sft_data(data_args, tokenizer, layout, resume_data_check(start, training_args, layout.name))
    layout = layout.settled(data.metadata["stats"].get("trees", 0))  # prefix trees only where the data has some
    collator = collator_for(layout, tokenizer.pad_token_id)
    check_collated_batch(collator([data.train[i] for i in range(min(MASK_CHECK_ROWS, len(data.train)))]))
    if start is None:
        return
    model = build_model(model_args, model_config, tokenizer, training_args.seed)
    check_layout_fits_model(layout, recurrent_mixers(model))
    stop_at_end_of_turn(model, tokenizer, data_args.end_of_turn_token)
    model = apply_finetuning_method(
        model, method_args, training_args.activation_checkpointing, model_args.base_model_reference
    )
    published = MultimodalBase.find(model_args.model_name_or_path, model_config)  # saved back in its layout
    length = SFT.sequence_length(data_args)
    train_in_output_dir(model, tokenizer, training_args, run_config, start, data, collator, length, published)


if __name__ == "__main__":
    sys.exit(run_cli(main))
