"""Deterministic fault injection for the resume tests and ``llmtrain.tools.verify_resume``.

Set ``LLMTRAIN_FAULT`` to make every rank kill itself with SIGKILL (no cleanup, like a node
loss) at one well-defined point of a run:

* ``kill_after_step=K``: right after optimizer step K, before anything of step K is saved;
* ``kill_in_accumulation=K``: during step K, after its first micro-batch's backward pass
  (needs ``gradient_accumulation_steps >= 2``);
* ``kill_during_save=K``: while checkpoint K is being written: every rank's files are on disk
  but the completion marker is not;
* ``kill_during_final_save=K``: while the final model of a run that ends at step K is being
  written: every rank has saved it to ``.final-partial/``, nothing is moved into place yet;
* ``nan_loss=K``: not a kill: rank 0's first micro-batch loss of step K becomes NaN (to test
  ``nonfinite_policy``).

Unset (the default) it costs one comparison per hook. A fault fires once per output dir (it
leaves ``.llmtrain_fault_fired`` there), so rerunning the same command, or the launcher's own
restart, with the variable still set resumes and finishes.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

FAULT_ENV = "LLMTRAIN_FAULT"
FIRED_FILE = ".llmtrain_fault_fired"
FAULT_POINTS = ("kill_after_step", "kill_in_accumulation", "kill_during_save", "kill_during_final_save", "nan_loss")


def parse_fault(spec: str | None) -> tuple[str, int] | None:
    """``"kill_after_step=3"`` -> ``("kill_after_step", 3)``; empty -> None; anything else is an error.

    >>> parse_fault("kill_during_save=4")
    ('kill_during_save', 4)
    >>> parse_fault("") is None
    True
    """
    if not spec:
        return None
    point, _, step = spec.partition("=")
    if point not in FAULT_POINTS or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected one of {', '.join(FAULT_POINTS)} followed by =STEP")
    return point, int(step)


class FaultInjector:
    """Fires the fault ``$LLMTRAIN_FAULT`` (or ``spec``) names, unless it already fired in ``output_dir``.

    ``first_step`` (set when training begins) is the step this attempt resumed at.
    """

    def __init__(self, output_dir: Path | None, spec: str | None = None) -> None:
        self.fault = parse_fault(os.environ.get(FAULT_ENV) if spec is None else spec)
        self.fired_file = output_dir / FIRED_FILE if output_dir is not None else None
        if self.fired_file is not None and self.fired_file.exists():
            self.fault = None
        self.first_step = 0

    def armed(self, point: str, step: int) -> bool:
        """Whether the fault ``point`` is set for ``step`` and this attempt has not resumed past it."""
        return self.fault is not None and self.fault == (point, step) and self.first_step < step

    def maybe_kill(self, point: str, step: int) -> None:
        if not self.armed(point, step):
            return
        logger.warning("%s=%s=%d: killing this rank now (SIGKILL)", FAULT_ENV, point, step)
        if self.fired_file is not None:
            self.fired_file.touch()
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
