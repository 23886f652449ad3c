"""Per-process set-up of a training launch: rank-aware log levels, DeepSpeed's CPU-only ops and comm."""

from __future__ import annotations

import logging

import datasets
import torch
import transformers

from llmtrain.compat import skip_deepspeed_shm_op
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
        skip_deepspeed_shm_op()


def init_deepspeed_comm(args: TrainArguments) -> None:
    """Let ``deepspeed.comm`` wrap the process group of a CPU launch before the model is built.

    On GPUs accelerate initialises ``deepspeed.comm`` itself; with ``--use_cpu`` it opens a plain
    torch.distributed group (gloo) and leaves ``deepspeed.comm`` alone until ``deepspeed.initialize``.
    ZeRO-3 builds the model earlier, inside ``deepspeed.zero.Init``, whose config check then sees a
    world size of 1 and fails ("train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 16 != 8 * 1 * 1"). Wrapping the existing group fixes that and
    changes nothing for ZeRO-2, which wraps it the same way a little later.
    """
    if not args.deepspeed or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
