"""The launcher's output: the console and ``<output_dir>/logs/launch-*.log``.

Three sources write here: the launcher's own ``launch: ...`` lines, the preflight's report and log
records, and the job's output (DeepSpeed's launchers, torchrun and every rank, read from one pipe).
The job's output may be held back while the preflight runs, so the report comes first; a
console that went away (a closed terminal) only stops the console copy, never the log. Output is
copied as it comes, unfiltered: a credential is refused as a flag (:mod:`llmtrain.config.secrets`),
so none is in the job's command line for the launchers to print.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what the entry points log in (llmtrain.cli)


class Console:
    """Console and log file, one writer at a time."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.log: BinaryIO | None = None
        self._mutex = threading.Lock()
        self._held: list[bytes] | None = None
        self._console_alive = True
        self._job_to_console = True

    def open_log(self, path: Path) -> None:
        self.log = path.open("ab", buffering=0)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def say(self, text: str, console: bool = True, log: bool = True) -> None:
        """One line of the launcher's own, to the console and the log (either can be left out)."""
        self._write(text.encode() + b"\n", console=console, log=log)

    def hold_job_output(self) -> None:
        """Keep the job's output back (in memory) until :meth:`release_job_output`."""
        with self._mutex:
            self._held = []

    def release_job_output(self, to_console: bool = True) -> None:
        """Write what was held, and from now on write the job's output as it comes.

        With ``to_console`` False, the job's output (held and to come) goes to the log only.
        """
        with self._mutex:
            held, self._held = self._held or [], None
            self._job_to_console = to_console
        for piece in held:
            self._write(piece, console=to_console)

    def pump(self, chunks: Iterable[bytes]) -> None:
        """Copy the job's output ``chunks``, as they are, until they end."""
        for piece in chunks:
            with self._mutex:
                if self._held is not None:
                    self._held.append(piece)
                    continue
                to_console = self._job_to_console
            self._write(piece, console=to_console)

    def _write(self, data: bytes, console: bool = True, log: bool = True) -> None:
        with self._mutex:
            if console and self._console_alive:
                try:
                    self.stream.write(data)
                    self.stream.flush()
                except OSError:
                    self._console_alive = False
            if log and self.log is not None:
                self.log.write(data)


class ConsoleHandler(logging.Handler):
    """Log records of the launcher's process (the preflight's) to the console and the log, as the entry points log."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.say(self.format(record))


def read_chunks(descriptor: int) -> Iterator[bytes]:
    """What a pipe delivers, chunk by chunk, until every writer has closed it."""
    while chunk := os.read(descriptor, 1 << 16):
        yield chunk
