"""Preemption: SIGTERM or SIGINT finishes the current step, saves a complete checkpoint and stops.

Every rank checks, at the end of each optimizer step, whether any rank was signalled (one
all-reduce of a single integer), so all ranks stop at the same step and save together. The run
then ends with :data:`PREEMPTED_EXIT_CODE`; rerunning the same command resumes from that
checkpoint. A second SIGINT (Ctrl-C twice) stops at once.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; distinct from success, crashes (1) and bad input (2)
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingPreempted(Exception):
    """Training stopped on a signal after saving a complete checkpoint; resume by rerunning."""


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM/SIGINT into "save at the end of this step, then stop" on every rank."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.preempted_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then saving a checkpoint and stopping", self.signal_name)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        requested = torch.tensor([1 if self.signal_name else 0], device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        if requested.item():
            self.preempted_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
