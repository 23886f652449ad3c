"""Errors that mean "the user's input is wrong", as opposed to bugs.

Entry points catch :class:`UserInputError`, log its one-line message and exit with
:data:`USER_ERROR_EXIT_CODE`, so a bad config or data file never ends in a traceback.
Each message names the file and line, or the field, that is wrong.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2  # argparse's code for bad arguments; distinct from a crash (1)


class UserInputError(Exception):
    """Something the user gave us (config, CLI flag, data file, output dir) is invalid."""


class ConfigError(UserInputError):
    """A config file, CLI override or cross-field rule is invalid; the message names the field."""


class DataError(UserInputError):
    """A data file is unreadable or malformed; the message names the file and, where known, the line."""
