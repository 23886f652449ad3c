"""Stopping cleanly: preemption signals and non-finite losses, agreed on by every rank each step.

At the end of each optimizer step every rank all-reduces two flags (one small tensor): "a rank
was signalled" and "a rank saw a non-finite loss or gradient norm during this step".

* SIGTERM or SIGINT: all ranks finish the step, save a complete checkpoint and stop; the run
  ends with :data:`~llmtrain.errors.PREEMPTED_EXIT_CODE` and rerunning the same command resumes from there. A
  second SIGINT (Ctrl-C twice) stops at once. The launcher's stop request (a signal it received, or a
  lost node) reaches each rank as a SIGTERM from its own watcher (:mod:`llmtrain.supervision`), so it
  takes this same path on every host.
* A NaN/inf loss: its gradients make the step's gradient norm non-finite and that optimizer
  update is skipped (see :class:`llmtrain.run.trainer.LlmTrainer`). With ``nonfinite_policy: stop`` all ranks then raise
  :class:`TrainingDiverged` naming the step (exit :data:`~llmtrain.errors.DIVERGED_EXIT_CODE`; nothing is saved,
  earlier checkpoints stay as they were); with ``skip`` the event is logged and training goes on.
* A non-finite gradient norm (finite loss, overflowing gradients): the update is skipped
  (DeepSpeed's ZeRO optimizer does so itself: its overflow check is on for fp32, fp16 and bf16;
  without DeepSpeed the trainer drops the gradients first); the policy then decides as above.
"""

from __future__ import annotations

import logging
import math
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain.errors import TrainingDiverged
from llmtrain.supervision import training_ended, training_started

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StepGuardCallback(TrainerCallback):
    """Per-step agreement between ranks on preemption signals and non-finite losses (module docstring)."""

    def __init__(self, nonfinite_policy: str = "stop") -> None:
        self.nonfinite_policy = nonfinite_policy
        self.signal_name: str | None = None
        self.preempted_at_step: int | None = None
        self.nonfinite_in_step: list[str] = []
        self.step_losses: list[torch.Tensor] = []
        self.skipped_nonfinite: list[dict[str, Any]] = []
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then saving a checkpoint and stopping", self.signal_name)

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Keep a micro-batch's loss to check at the step's end (one sync per step, not per micro-batch)."""
        self.step_losses.append(loss.detach().reshape(-1)[:1].float())

    def report_nonfinite(self, step: int, what: str) -> None:
        """Called by the trainer for a NaN/inf loss or gradient norm it has already kept from the optimizer."""
        logger.warning("step %d: %s", step, what)
        self.nonfinite_in_step.append(what)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        training_started()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.step_losses:
            losses = torch.cat(self.step_losses).tolist()
            self.step_losses = []
            for index, loss in enumerate(losses):
                if not math.isfinite(loss):
                    self.report_nonfinite(state.global_step, f"loss {loss} on micro-batch {index}")
        flags = torch.tensor([1 if self.signal_name else 0, len(self.nonfinite_in_step)], device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, nonfinite = (int(value) for value in flags.tolist())
        if nonfinite:
            local = "; ".join(self.nonfinite_in_step) or "on another rank"
            self.nonfinite_in_step = []
            if self.nonfinite_policy == "stop":
                raise TrainingDiverged(
                    f"non-finite values at step {state.global_step} ({local}); stopped before the optimizer used "
                    "them (nonfinite_policy: stop). Nothing was saved for this step; lower the learning rate or "
                    "check the data, then rerun to resume from the last complete checkpoint, or set "
                    "nonfinite_policy: skip"
                )
            self.skipped_nonfinite.append({"step": state.global_step, "what": local})
        if signalled:
            self.preempted_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        training_ended()
