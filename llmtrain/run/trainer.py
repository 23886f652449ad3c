"""The Trainer this project runs: the HF Trainer plus the ledger, the step guard, faults, and its callbacks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINING_ARGS_NAME

from llmtrain.config.arguments import TrainArguments
from llmtrain.errors import ConfigError
from llmtrain.loss import enable_memory_efficient_loss
from llmtrain.metrics import ThroughputCallback, TokenCounter
from llmtrain.run.checkpoints import CompleteCheckpointCallback, reporting_full_disk
from llmtrain.run.faults import FaultInjector
from llmtrain.run.guards import StepGuardCallback
from llmtrain.run.ledger import DataLedger
from llmtrain.run.tracking import PerplexityCallback, swanlab_callbacks

logger = logging.getLogger(__name__)


class LlmTrainer(Trainer):
    """The HF Trainer plus a data-order ledger, the non-finite guard and the fault-injection points.

    A non-finite gradient norm never reaches the weights: DeepSpeed's ZeRO optimizer skips such
    an update itself (its overflow check covers fp32, fp16 and bf16); without DeepSpeed the
    gradients are dropped before ``optimizer.step()``. So a NaN micro-batch costs its whole
    optimizer step (all micro-batches of it) under ``nonfinite_policy: skip``.

    Everything else (loss, DeepSpeed, resume of model/optimizer/scheduler/RNG state and the
    skip-based data resume) is the stock Trainer's.
    """

    def __init__(self, *args: Any, step_guard: StepGuardCallback, ledger: DataLedger, faults: FaultInjector,
                 token_counter: TokenCounter, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter
        self.step_guard = step_guard
        self.ledger = ledger
        self.faults = faults

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        if len(self.ledger.pending) == 1:  # the first micro-batch of this step is back-propagated by now
            self.faults.maybe_kill("kill_in_accumulation", step)
        micro_batch = len(self.ledger.pending)
        self.ledger.record(inputs)
        self.token_counter.observe(inputs)
        loss: Any = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if micro_batch == 0 and self.args.process_index == 0 and self.faults.armed("nan_loss", step):
            loss = loss * float("nan")
        # Checked at the step's end. A NaN/inf loss is back-propagated as it is, so every rank runs the
        # same collectives; its gradients make the step's gradient norm non-finite, and that update is skipped.
        self.step_guard.watch_loss(loss)
        return loss

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The stock save, without the Trainer's own rotation.

        That rotation orders by mtime and runs before the other ranks finish saving;
        :class:`CompleteCheckpointCallback` rotates instead, after the completion marker. The user's
        ``save_total_limit`` is switched off for the save only, and the pickled arguments the
        checkpoint holds are rewritten with it. A full disk ends the run with one clear error.
        """
        keep = self.args.save_total_limit
        self.args.save_total_limit = None
        checkpoint = Path(str(self.args.output_dir)) / f"checkpoint-{self.state.global_step}"
        with reporting_full_disk(checkpoint):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = keep
            if self.args.should_save:
                torch.save(self.args, checkpoint / TRAINING_ARGS_NAME)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """The stock epoch, unless the run already reached ``max_steps``: then nothing is trained.

        A run resumed from a checkpoint at its last step (killed while saving its final model) would
        otherwise skip to that step inside the epoch and train one step more than asked. With the
        loop left at once, ``train()`` returns and the final save is all that happens.
        """
        if self.state.global_step >= self.state.max_steps:
            logger.info(
                "step %d already reaches max_steps=%d: nothing left to train; finishing the final save only",
                self.state.global_step,
                self.state.max_steps,
            )
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            if not self.is_deepspeed_enabled:
                model.zero_grad(set_to_none=True)  # optimizer.step() leaves parameters without gradients alone
            self.step_guard.report_nonfinite(
                self.state.global_step + 1, f"gradient norm {float(norm)}; this optimizer update is skipped"
            )
        return norm


class RunRecordCallback(TrainerCallback):
    """Appends each step's data-order ledger line and fires the step-level fault points."""

    def __init__(self, ledger: DataLedger, faults: FaultInjector) -> None:
        self.ledger = ledger
        self.faults = faults

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.faults.first_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.ledger.end_step(state.global_step)
        self.faults.maybe_kill("kill_after_step", state.global_step)


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    manifest: dict[str, Any],
    sequence_length: int | None = None,
) -> LlmTrainer:
    """A Trainer with complete-checkpoint marking, the step guard, the ledger, perplexity and SwanLab.

    ``manifest`` (see :mod:`llmtrain.run.manifest`) is written into every checkpoint; its ``run_id``
    names the SwanLab run. ``sequence_length`` (the stage's row length) sets the attention term of
    the MFU logged during training; without it no MFU is logged.
    """
    eval_strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is None and eval_strategy != "no":
        raise ConfigError(
            f"eval_strategy={eval_strategy!r} but there is no validation data: set "
            "validation_files or validation_split_percentage > 0, or eval_strategy: 'no'"
        )
    faults = FaultInjector(Path(str(args.output_dir)))
    ledger = DataLedger(Path(str(args.output_dir)), args.process_index)
    step_guard = StepGuardCallback(args.nonfinite_policy)
    token_counter = TokenCounter()
    if args.loss_implementation != "standard":
        enable_memory_efficient_loss(model, backend=args.loss_implementation)
    return LlmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[
            PerplexityCallback(),
            ThroughputCallback(token_counter, model.config, sequence_length),  # before SwanLab, which logs its keys
            RunRecordCallback(ledger, faults),  # the step's ledger line is written before a guard can stop
            step_guard,
            CompleteCheckpointCallback(keep=args.save_total_limit, manifest=manifest, faults=faults),
            *swanlab_callbacks(args, manifest["config"], manifest["run_id"]),
        ],
        token_counter=token_counter,
        step_guard=step_guard,
        ledger=ledger,
        faults=faults,
    )
