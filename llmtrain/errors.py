"""How a run ends when it does not succeed: the exception for each case and the exit code it maps to.

Entry points catch :class:`UserInputError`, log its one-line message and exit with
:data:`USER_ERROR_EXIT_CODE`, so a bad config or data file never ends in a traceback.
Each message names the file and line, or the field, that is wrong. The launchers read the
codes: bad input (2) and a non-finite loss (3) are never retried; preemption (75) is resumed by
rerunning the same command. Mapping exceptions to codes is :func:`llmtrain.cli.run_cli`.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2  # argparse's code for bad arguments; distinct from a crash (1)
DIVERGED_EXIT_CODE = 3  # a rerun would hit the same batch again: launchers do not retry it
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; distinct from success, crashes (1) and bad input (2)


class UserInputError(Exception):
    """Something the user gave us (config, CLI flag, data file, output dir) is invalid."""


class ConfigError(UserInputError):
    """A config file, CLI override or cross-field rule is invalid; the message names the field."""


class DataError(UserInputError):
    """A data file is unreadable or malformed; the message names the file and, where known, the line."""


class InvalidRecord(DataError):
    """One record of a data file is unusable; ``where`` is its ``file:line`` and ``reason`` a short code to count by.

    >>> str(InvalidRecord("a.jsonl:3", "blank_content", "turn 2 (gpt) has no content: 'value' is blank"))
    "a.jsonl:3: turn 2 (gpt) has no content: 'value' is blank"
    """

    def __init__(self, where: str, reason: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.reason = reason


class StorageFull(UserInputError):
    """The disk filled up while a checkpoint or the final model was written; the message names path and free space."""


class TrainingPreempted(Exception):
    """Training stopped on a signal after saving a complete checkpoint; resume by rerunning."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm under ``nonfinite_policy: stop``."""
