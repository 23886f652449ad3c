"""The preflight (``llmtrain.tools.doctor``, fast mode) run in the launcher's own process, beside the job's start.

The doctor's imports (torch, transformers) take most of its few seconds; DeepSpeed's runner, its
``launch.py`` and the ranks' own imports take longer. So the launcher starts the job first and runs
the doctor meanwhile on a thread: the ranks wait for its verdict before ``main``
(:func:`llmtrain.supervision.attach_rank`), and the job's output is held back until the report is
written, so the console reads as before: the report, then the job.
"""

from __future__ import annotations

import gc
import io
import logging
import threading
from collections.abc import Sequence

from llmtrain.cli import settle_imports
from llmtrain.errors import USER_ERROR_EXIT_CODE, UserInputError
from llmtrain.launch.console import Console
from llmtrain.stages import Stage

logger = logging.getLogger(__name__)


class Preflight:
    """The doctor's checks for one launch, on a thread; :attr:`status` is None until they have run."""

    def __init__(self, stage: Stage, args: Sequence[str], console: Console) -> None:
        self.stage = stage
        self.args = list(args)
        self.console = console
        self.status: int | None = None
        self._thread = threading.Thread(target=self._run, name="preflight", daemon=True)

    def start(self) -> Preflight:
        self._thread.start()
        return self

    def done(self) -> bool:
        return self.status is not None

    def _run(self) -> None:
        try:
            self.status = self._check()
        except Exception:  # a crash of the doctor itself must still end the launch with its traceback
            logger.exception("the preflight crashed")
            self.status = 1

    def _check(self) -> int:
        # Imported here: the launcher stays light until the job has started. Without collections during the
        # imports, then settled, as in the entry points (the launcher of a 1-step 2-rank CPU run: 5.4 -> 3.5 CPU-s).
        gc.disable()
        try:
            from llmtrain.tools.doctor import ERROR, diagnose
            from llmtrain.tools.doctor.report import write_report
        finally:
            settle_imports()

        try:
            findings = diagnose(self.stage.name, self.args, fast=True)
        except UserInputError as error:
            self.console.say(f"doctor: {error}")
            return USER_ERROR_EXIT_CODE
        report = io.StringIO()
        write_report(findings, report, fast=True)
        for line in report.getvalue().splitlines():
            self.console.say(line)
        return USER_ERROR_EXIT_CODE if any(finding.status == ERROR for finding in findings) else 0
