"""The doctor's findings: the three statuses, one greppable line per finding, and the report that collects them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

from llmtrain.errors import UserInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")

OK, WARNING, ERROR = "ok", "WARNING", "ERROR"


class PreflightError(UserInputError):
    """The environment cannot run the configured training (a library, GPU, disk or permission problem)."""


@dataclass(frozen=True)
class Finding:
    """One reported line: a check's status and what it found."""

    status: str
    check: str
    message: str

    def line(self) -> str:
        """The report line, e.g. ``doctor: ERROR   output_dir: ...`` (always a single line).

        >>> Finding(ERROR, "data", "a.jsonl:3: invalid JSON\\n(column 2)").line()
        'doctor: ERROR   data: a.jsonl:3: invalid JSON (column 2)'
        """
        return f"doctor: {self.status:<7} {self.check}: {' '.join(self.message.split())}"


def describe(error: UserInputError | OSError) -> str:
    """The one-line message of a user error, or of a filesystem error with its path."""
    if isinstance(error, OSError) and not isinstance(error, UserInputError):
        return f"{error.filename}: {error.strerror or error}" if error.filename else str(error.strerror or error)
    return str(error)


class Report:
    """Collects findings; :meth:`attempt` turns a check's exception into an ERROR line."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, status: str, check: str, message: str) -> None:
        self.findings.append(Finding(status, check, message))

    def attempt(self, check: str, action: Callable[[], T]) -> T | None:
        """``action()``, or None after recording an ERROR for ``check`` if it raised."""
        try:
            return action()
        except (UserInputError, OSError) as error:
            self.add(ERROR, check, describe(error))
        except Exception as error:  # a doctor must report every failure, not stop at the first traceback
            logger.debug("check %s failed", check, exc_info=True)
            self.add(ERROR, check, f"unexpected {type(error).__name__}: {error}")
        return None

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == ERROR]


def write_report(findings: Sequence[Finding], stream: TextIO, fast: bool) -> None:
    """Every finding's line, then a one-line summary."""
    for finding in findings:
        stream.write(finding.line() + "\n")
    errors = sum(finding.status == ERROR for finding in findings)
    warnings = sum(finding.status == WARNING for finding in findings)
    stream.write(f"doctor: {errors} error(s), {warnings} warning(s){' (--fast)' if fast else ''}\n")
    stream.flush()
