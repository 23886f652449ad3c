"""Per-process set-up of a training launch: rank-aware log levels and DeepSpeed's CPU-only ops."""

from __future__ import annotations

import logging

import datasets
import torch
import transformers

from llmtrain.config.arguments import TrainArguments


def set_rank_log_level(args: TrainArguments) -> None:
    """INFO on the main process, warnings and errors only on the others."""
    level = logging.INFO if args.should_log else logging.WARNING
    logging.getLogger().setLevel(level)
    # transformers and datasets log every config they load at INFO; keep their warnings only,
    # except the Trainer's own run banner.
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.get_logger("transformers.trainer").setLevel(level)


def disable_unused_cpu_ops() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU-only machines.

    It serves inference all-reduce only (training goes through gloo) but costs a ~50 s
    C++ build on a cold cache; measured to leave training identical.
    """
    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
