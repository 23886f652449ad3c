"""The channel between a launcher and its ranks: one control file in the output dir, read by every rank.

The launcher (:mod:`llmtrain.launch`) creates ``<output_dir>/logs/.control/node<N>-<id>/`` and names it
to the job in :data:`CONTROL_DIR_VARIABLE`, which reaches every rank: DeepSpeed's local launch and
torchrun pass the environment on, and DeepSpeed's ssh launch forwards ``LLMTRAIN_*`` variables
through the launcher's env file. Multi-node launches already need ``output_dir`` on a filesystem
every node shares, so remote ranks read the same file as local ones. In it:

* ``control``: one JSON record the launcher rewrites in place every :data:`BEAT_S` seconds (its
  heartbeat: ``beat`` counts up) and at once on every change of ``state``:

  - ``preflight``: the launcher's preflight (the doctor) is still running; ranks wait before ``main``;
  - ``run``: train;
  - ``stop``: save a complete checkpoint at the step reached and stop (a SIGTERM, SIGINT or SIGHUP
    reached the launcher, or a node was lost); ``signal`` names what the launcher received;
  - ``kill``: the grace period is over, or a second Ctrl-C: end at once;
  - ``failed``: the preflight failed: do not start;
  - ``ended``: the launcher has exited (the directory stays until the node's next launch, so that a
    rank starting late reads this and does not train).

* ``attempt-<A>.rank-<R>.exit``: each rank's exit code, written by :func:`report_exit` as the rank
  ends. The launcher reads the codes from there, whichever launcher (DeepSpeed's runner, its
  per-node ``launch.py``, torchrun, pdsh) stands in between and whatever code that one reports.

On a rank (:func:`attach_rank`, called by :func:`llmtrain.cli.run_cli` before ``main``), a daemon
thread reads ``control`` every :data:`BEAT_S` seconds (one small read; close-to-open consistency
makes each ``open`` see the launcher's latest write on NFS too) and turns a stop request, or the
loss of the launcher, into one SIGTERM to its own process: the signal the ranks already handle
(:class:`llmtrain.run.guards.StepGuardCallback` agrees on it across ranks, saves and stops).
The launcher is lost when its process is gone (same host: its pid and start time, checked at
once) or, seen from another host, when ``beat`` has not changed for ``node_timeout_s`` seconds
(counted on this host's own clock, so the hosts' clocks need not agree). A rank that has not
ended ``stop_grace_s + node_timeout_s`` seconds after a stop request, or that reads ``kill``,
SIGKILLs itself: no rank outlives its launcher unsupervised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from llmtrain.errors import TrainingPreempted, UserInputError

logger = logging.getLogger(__name__)

CONTROL_DIR_VARIABLE = "LLMTRAIN_LAUNCH_CONTROL"
CONTROL_FILE = "control"
BEAT_S = 1.0  # how often the launcher rewrites the control file and the ranks read it

PREFLIGHT, RUN, STOP, KILL, FAILED, ENDED = "preflight", "run", "stop", "kill", "failed", "ended"
STATES = (PREFLIGHT, RUN, STOP, KILL, FAILED, ENDED)


# --- processes and hosts ------------------------------------------------------------------------


def this_host() -> tuple[str, str]:
    """``(hostname, pid namespace)``: where a pid names a process (containers on one host have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return socket.gethostname(), namespace


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, exited but not reaped, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def process_start(pid: int) -> str:
    """When ``pid`` started (``/proc/<pid>/stat`` field 22, clock ticks since boot), or "" where unknown.

    With the pid it names one process: a pid reused after the process ended has another start.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


# --- the control record -------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlRecord:
    """What the control file holds (module docstring)."""

    launch_id: str
    state: str
    beat: int
    attempt: int
    host: str
    pid: int
    pid_start: str
    pid_namespace: str
    node_rank: int
    node_timeout_s: float
    stop_grace_s: float
    log: str = ""  # the launcher's console log, where a rank writes once its launcher is gone
    signal: str = ""
    exit_code: int | None = None

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ControlRecord | None:
        """The record in ``data``, or None for anything else (a write caught half-way, an empty file).

        >>> record = new_record(node_rank=0, node_timeout_s=30, stop_grace_s=600)
        >>> ControlRecord.from_json(record.to_json()) == record, ControlRecord.from_json(b'{"state": "ru')
        (True, None)
        """
        try:
            fields = json.loads(data)
            record = cls(**fields)
        except (ValueError, TypeError):
            return None
        return record if record.state in STATES else None

    def same_process_space(self) -> bool:
        """Whether the launcher's pid can be checked from here (same host and pid namespace)."""
        host, namespace = this_host()
        return self.host == host and self.pid_namespace == namespace

    def launcher_gone(self) -> bool:
        """Whether the launcher's process has ended; False where that cannot be seen from here."""
        return self.same_process_space() and (not pid_alive(self.pid) or process_start(self.pid) != self.pid_start)

    def describe(self) -> str:
        """``host H, pid P``: who wrote the record."""
        return f"host {self.host}, pid {self.pid}"


def new_record(
    node_rank: int, node_timeout_s: float, stop_grace_s: float, state: str = RUN, log: str = ""
) -> ControlRecord:
    """A fresh record for this process as the launcher."""
    host, namespace = this_host()
    return ControlRecord(
        log=log,
        launch_id=secrets.token_hex(6),
        state=state,
        beat=0,
        attempt=1,
        host=host,
        pid=os.getpid(),
        pid_start=process_start(os.getpid()),
        pid_namespace=namespace,
        node_rank=node_rank,
        node_timeout_s=node_timeout_s,
        stop_grace_s=stop_grace_s,
    )


def read_control(directory: Path) -> ControlRecord | None:
    """The record in ``directory``'s control file, or None when it is missing, unreadable or half-written."""
    try:
        with open(directory / CONTROL_FILE, "rb") as file:  # a fresh open: NFS revalidates its cache here
            return ControlRecord.from_json(file.read())
    except OSError:
        return None


class Silence:
    """How long a control file's heartbeat has not moved, on this host's monotonic clock.

    >>> silence = Silence()
    >>> record = new_record(node_rank=0, node_timeout_s=30, stop_grace_s=600)
    >>> silence.observe(record, now=100.0); silence.observe(record, now=130.0); silence.seconds(now=131.0)
    31.0
    >>> silence.observe(replace(record, beat=1), now=132.0); silence.seconds(now=133.0)
    1.0
    """

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self.since = 0.0

    def observe(self, record: ControlRecord | None, now: float) -> None:
        key = (record.launch_id, record.beat) if record is not None else None
        if key is not None and key != self.key:
            self.key, self.since = key, now
        elif self.key is None and not self.since:
            self.since = now

    def seconds(self, now: float) -> float:
        return now - self.since


class ControlWriter:
    """The launcher's side: writes the record, beats every :data:`BEAT_S` seconds until closed."""

    def __init__(self, directory: Path, record: ControlRecord) -> None:
        self.directory = directory
        self.record = record
        self._mutex = threading.Lock()
        self._closed = threading.Event()
        self._fd: int | None = None

    def open(self) -> ControlWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.directory / CONTROL_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        self._write()
        threading.Thread(target=self._beat, name="launch heartbeat", daemon=True).start()
        return self

    def update(self, **changes: Any) -> None:
        """Change fields of the record and write it at once."""
        with self._mutex:
            self.record = replace(self.record, **changes)
            self._write_locked()

    def close(self, exit_code: int) -> None:
        """Write ``ended`` and stop beating: peers see the launcher leave, and a rank starting late does not train.

        The directory stays; the node's next launch removes it.
        """
        self._closed.set()
        with self._mutex:
            if self._fd is None:
                return
            self.record = replace(self.record, state=ENDED, exit_code=exit_code)
            self._write_locked()
            os.close(self._fd)
            self._fd = None

    def _write(self) -> None:
        with self._mutex:
            self._write_locked()

    def _write_locked(self) -> None:
        # In place, not through a rename: on NFS a reader's open then sees the same file, never a
        # stale handle. A reader catching the write half-way reads invalid JSON and ignores it.
        if self._fd is None:
            return
        data = self.record.to_json()
        try:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
        except OSError as error:
            logger.warning("could not write %s: %s", self.directory / CONTROL_FILE, error)

    def _beat(self) -> None:
        while not self._closed.wait(BEAT_S):
            with self._mutex:
                self.record = replace(self.record, beat=self.record.beat + 1)
                self._write_locked()


def exit_file(directory: Path, attempt: int, rank: int) -> Path:
    """Where rank ``rank`` of attempt ``attempt`` writes its exit code."""
    return directory / f"attempt-{attempt}.rank-{rank}.exit"


def read_exit_codes(directory: Path, attempt: int) -> dict[int, int]:
    """``{rank: exit code}`` of the ranks of ``attempt`` that wrote one (a rank killed by a signal writes none)."""
    codes: dict[int, int] = {}
    for path in directory.glob(f"attempt-{attempt}.rank-*.exit"):
        with contextlib.suppress(OSError, ValueError):
            codes[int(path.name.split(".rank-")[1].removesuffix(".exit"))] = int(path.read_text())
    return codes


# --- the rank's side ----------------------------------------------------------------------------

STARTING, TRAINING, FINISHED = "starting", "training", "finished"


class PreflightRefused(UserInputError):
    """The launcher's preflight failed; the rank does not start (the launcher shows the report)."""


class _RankLink:
    """This rank's view of its launcher: the phase of the run, and whether a stop was asked for."""

    def __init__(self, directory: Path, rank: int, record: ControlRecord) -> None:
        self.directory = directory
        self.rank = rank
        self.record = record
        self.phase = STARTING
        self.stop_reason: str | None = None
        self.stop_since: float | None = None
        self.silence = Silence()
        self.silence.observe(record, time.monotonic())

    def refresh(self) -> None:
        """Read the control file once; keep the last good record when this read fails."""
        record = read_control(self.directory)
        self.silence.observe(record, time.monotonic())
        if record is not None:
            self.record = record
        elif not self.directory.exists():
            self.record = replace(self.record, state=ENDED)

    def why_stop(self) -> str | None:
        """Why this rank should stop now, or None to go on."""
        record = self.record
        if record.state == STOP:
            why = f"it received {record.signal}" if record.signal.startswith("SIG") else record.signal
            return f"the launcher asks every rank to stop ({why or 'its job is ending'})"
        if record.state in (ENDED, FAILED, KILL):
            return f"the launcher ({record.describe()}) has ended"
        if record.launcher_gone():
            return f"the launcher ({record.describe()}) is no longer running"
        if not record.same_process_space() and self.silence.seconds(time.monotonic()) > record.node_timeout_s:
            return f"no heartbeat from the launcher ({record.describe()}) for over {record.node_timeout_s:.0f} s"
        return None

    def watch(self) -> None:
        """The watcher thread's loop (module docstring)."""
        while True:
            time.sleep(BEAT_S)
            self.refresh()
            now = time.monotonic()
            if self.record.state == KILL:
                self._kill_self("the launcher kills every rank now")
            reason = self.why_stop()
            if reason is not None and self.stop_reason is None:
                self.stop_reason, self.stop_since = reason, now
                if self.record.state != STOP:  # the launcher is gone: nobody reads this rank's output any more
                    divert_output(self.record.log)
                logger.warning("%s: stopping after this step", reason)
                if self.phase != FINISHED:  # after training, the final save is left to finish
                    os.kill(os.getpid(), signal.SIGTERM)
            deadline = self.record.stop_grace_s + self.record.node_timeout_s
            if self.stop_since is not None and now - self.stop_since > deadline:
                self._kill_self(f"still running {deadline:.0f} s after the stop request")

    def _kill_self(self, why: str) -> None:
        logger.error("rank %d: %s; killing this rank (SIGKILL)", self.rank, why)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM outside training: a stop request ends a starting rank with exit 75; another SIGTERM ends it."""
        if self.stop_reason is None:  # not ours: what SIGTERM always did outside training
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.phase == STARTING:
            raise TrainingPreempted(
                f"stopped before training started ({self.stop_reason}): nothing new to save; "
                "rerun the same command to resume"
            )
        logger.warning("%s: training has ended; finishing the final save first", self.stop_reason)


_LINK: _RankLink | None = None
_DIVERTED = threading.Lock()


def divert_output(log: str) -> None:
    """Point this process's stdout and stderr at the launcher's log (or /dev/null): its pipe has no reader now.

    Once, and for every writer at once (the file descriptors change, not Python's stream objects), so
    that the rank's last words (the save, the stop) go where the launcher's console log went.
    """
    if not _DIVERTED.acquire(blocking=False):
        return
    try:
        target = os.open(log, os.O_WRONLY | os.O_APPEND) if log else os.open(os.devnull, os.O_WRONLY)
    except OSError:
        target = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(target, descriptor)
    os.close(target)


class _PipeSafe:
    """A text stream that survives the loss of its reader: a write to a pipe nobody reads (the launcher
    died) diverts the output (:func:`divert_output`) and is retried, instead of raising in the middle of
    training, before the rank has heard of the loss and saved."""

    def __init__(self, stream: Any, log: str) -> None:
        self._stream = stream
        self._log = log

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            divert_output(self._log)
            with contextlib.suppress(OSError):
                self._stream.write(text)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            divert_output(self._log)
            with contextlib.suppress(OSError):
                self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def attach_rank(environ: dict[str, str] | None = None) -> None:
    """Put this process under its launcher's control, when it is a rank of a launch (module docstring).

    Waits while the launcher's preflight runs; raises :class:`PreflightRefused` when it failed and
    :class:`TrainingPreempted` when a stop came first. Does nothing outside a launch, and warns (and
    runs unsupervised) when the launcher's control file cannot be read from this host.
    """
    global _LINK
    env = os.environ if environ is None else environ
    directory = env.get(CONTROL_DIR_VARIABLE)
    if not directory or _LINK is not None:
        return
    record = read_control(Path(directory))
    if record is None:
        logger.warning(
            "the launcher's control file %s cannot be read from this host: this rank runs unsupervised (stop requests "
            "and the launcher's loss do not reach it; output_dir must be on a filesystem every node shares)",
            Path(directory) / CONTROL_FILE,
        )
        return
    link = _RankLink(Path(directory), int(env.get("RANK", "0")), record)
    while link.record.state == PREFLIGHT and link.why_stop() is None:
        time.sleep(BEAT_S / 4)
        link.refresh()
    if link.record.state == FAILED:
        raise PreflightRefused("the launcher's preflight failed (its report names the problem); not starting")
    reason = link.why_stop()
    if reason is not None:
        raise TrainingPreempted(f"stopped before training started ({reason}); rerun the same command to resume")
    _LINK = link
    sys.stdout = _PipeSafe(sys.stdout, record.log)
    sys.stderr = _PipeSafe(sys.stderr, record.log)
    signal.signal(signal.SIGTERM, link.on_sigterm)
    threading.Thread(target=link.watch, name="launcher watch", daemon=True).start()


def training_started() -> None:
    """Called as training begins: from here the step guard answers SIGTERM (agreed stop and save)."""
    if _LINK is not None:
        _LINK.phase = TRAINING


def training_ended() -> None:
    """Called as training ends: a stop request no longer interrupts the final save."""
    if _LINK is not None:
        _LINK.phase = FINISHED


def report_exit(code: int, environ: dict[str, str] | None = None) -> None:
    """Record this rank's exit code for the launcher; nothing outside a launch."""
    env = os.environ if environ is None else environ
    directory = env.get(CONTROL_DIR_VARIABLE)
    if not directory:
        return
    record = _LINK.record if _LINK is not None else read_control(Path(directory))
    if record is None:
        return
    path = exit_file(Path(directory), record.attempt, int(env.get("RANK", "0")))
    try:
        path.write_text(f"{code}\n")
    except OSError as error:
        logger.warning("could not record this rank's exit code in %s: %s", path, error)
