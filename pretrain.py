"""Pretrain a Qwen2.5-architecture causal LM on block-grouped text.

    bash pretrain.sh [configs/X.yaml] [--key value ...]      # launcher: GPUs, CPU ranks, nodes
    python pretrain.py [configs/X.yaml] [--key value ...]    # one process, no DeepSpeed

With no config, configs/pretrain_tiny.yaml is used: the embedded tiny model and demo corpus.
"""

from __future__ import annotations

import gc
import sys

if __name__ == "__main__":  # imported as a module, it leaves the collector alone
    gc.disable()  # while the training stack is imported: run_cli freezes what it built, then collects again

from llmtrain.cli import run_cli
from llmtrain.config.parser import parse_args, resolved_config
from llmtrain.data.pretrain import collate_blocks, prepare_pretrain_data
from llmtrain.modeling import build_model, check_sequence_length, load_model_config, load_tokenizer_for
from llmtrain.multimodal import MultimodalBase
from llmtrain.run.output_dir import inspect_output_dir
from llmtrain.run.process import disable_unused_cpu_ops, init_deepspeed_comm, set_rank_log_level
from llmtrain.run.train import resume_data_check, train_in_output_dir
from llmtrain.stages import PRETRAIN


def main(argv: list[str]) -> None:
    """Parse -> tokenizer and model config -> tokenized blocks -> model -> Trainer -> save."""
    disable_unused_cpu_ops()
    model_args, data_args, training_args = parse_args(PRETRAIN.dataclass_types(), argv, PRETRAIN.default_config)
    set_rank_log_level(training_args)
    init_deepspeed_comm(training_args)  # before the model: ZeRO-3 builds it partitioned across the ranks
    tokenizer = load_tokenizer_for(model_args)
    model_config = load_model_config(model_args)
    check_sequence_length(PRETRAIN.sequence_length(data_args), model_config, PRETRAIN.length_field)
    run_config = resolved_config(model_args, data_args, training_args)
    start = None if data_args.prepare_only else inspect_output_dir(training_args, run_config)
    if start is not None and start.already_finished:
        return
    with training_args.main_process_first(desc="tokenize"):
        data = prepare_pretrain_data(data_args, tokenizer, resume_data_check(start, training_args))
    if start is None:
        return
    model = build_model(model_args, model_config, tokenizer, training_args.seed)
    published = MultimodalBase.find(model_args.model_name_or_path, model_config)  # saved back in its layout
    length = PRETRAIN.sequence_length(data_args)
    train_in_output_dir(model, tokenizer, training_args, run_config, start, data, collate_blocks, length, published)


if __name__ == "__main__":
    sys.exit(run_cli(main))
