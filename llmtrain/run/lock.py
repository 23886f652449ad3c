"""An exclusive lock on a run's output dir, safe on shared (network) filesystems too.

One launch trains in an output dir at a time: a second one is refused, naming the holder, so it
can neither overwrite the first one's model nor append a second copy of every step to its ledger.

    lock = OutputDirLock(output_dir / LOCK_FILE).acquire(run_id="abc")
    try:
        ...  # train
    finally:
        lock.release()

How it works (no ``flock``: it is not honoured across the nodes of a network filesystem):

* **acquire**: ``open(O_CREAT | O_EXCL)`` of the lock file, atomic on local disks and NFS v3+, so of
  two launches exactly one creates it. It holds one JSON line naming the holder:
  ``{"host", "pid", "pid_namespace", "started" (ISO time), "run_id", "token"}``.
* **heartbeat**: a daemon thread sets the file's mtime every :data:`HEARTBEAT_INTERVAL_S`.
* **stale**: a lock is stale when its heartbeat is older than :data:`STALE_AFTER_S` (whatever its
  pid: a live pid that does not refresh the file is a reused pid), or at once when it names a pid
  of this host (and pid namespace) that is no longer running: the launcher's restart after a crash
  takes the lock over without waiting.
* **takeover**: the stale file is renamed aside (atomic: of two launches racing for it, only one
  rename finds it), checked to be the very file judged stale (else put back), deleted, and then
  created afresh with ``O_EXCL`` as above: one winner, and the loser is refused like any launch.
* **release**: :meth:`OutputDirLock.release` (idempotent) deletes the file if it is still ours; it
  is also registered with :mod:`atexit`, so exceptions and ``sys.exit`` release it too. A process
  that ends without cleanup (SIGKILL, ``os._exit``, power loss) leaves the file behind, and the
  next launch takes it over as stale.

No rank logic here: the caller decides which process locks (the main process, in
:func:`llmtrain.run.output_dir.open_output_dir`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
from llmtrain.supervision import pid_alive, this_host

logger = logging.getLogger(__name__)

LOCK_FILE = ".llmtrain.lock"
HEARTBEAT_INTERVAL_S = 15.0
# Eight missed heartbeats: far beyond a slow checkpoint save or an NFS hiccup, and well within the
# patience of a user relaunching after a node loss. Clocks of the hosts sharing a filesystem must
# agree to well within this (the writer's clock sets the mtime, the reader's judges its age).
STALE_AFTER_S = 120.0
# A lock file is empty between its creation and its first write (microseconds): read it again.
READ_RETRIES = 5
READ_RETRY_S = 0.05
# Each failed attempt means the file changed hands meanwhile; more than a few means a storm of launches.
ACQUIRE_ATTEMPTS = 5


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock file, read from it, and which version of the file was read.

    ``heartbeat`` is the file's mtime (seconds since the epoch); ``file_id`` (device, inode, mtime
    in ns) identifies the exact file version, so a takeover can check it moved the file it judged.
    """

    host: str
    pid: int | None
    started: str
    run_id: str
    token: str
    pid_namespace: str
    heartbeat: float
    file_id: tuple[int, int, int]

    def describe(self) -> str:
        """``host H, pid P, started S, run id R``, or what is known of an unreadable lock file.

        >>> LockHolder("node1", 42, "2026-11-30T05:53:59+00:00", "r1", "t", "", 0.0, (0, 0, 0)).describe()
        'host node1, pid 42, started 2026-11-30T05:53:59+00:00, run id r1'
        """
        if self.pid is None:
            return "an unknown process (the lock file is unreadable)"
        run = f", run id {self.run_id}" if self.run_id else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{run}"


def read_holder(path: Path) -> LockHolder | None:
    """The holder named by the lock file at ``path``, or None when there is none.

    A file whose content is not (yet) a holder record is read again a few times, then reported
    with ``pid=None``: only its heartbeat can then say whether it is stale.
    """
    for attempt in range(READ_RETRIES):
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                content = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            return None  # no lock, or no directory to hold one (the writability check names that)
        except OSError as error:
            raise ConfigError(f"cannot read the output dir lock {path} ({error.strerror or error})") from error
        record = _parse_record(content)
        if record is not None or attempt == READ_RETRIES - 1:
            break
        time.sleep(READ_RETRY_S)
    record = record or {}
    pid = record.get("pid")
    return LockHolder(
        host=str(record.get("host", "?")),
        pid=pid if isinstance(pid, int) else None,
        started=str(record.get("started", "?")),
        run_id=str(record.get("run_id", "")),
        token=str(record.get("token", "")),
        pid_namespace=str(record.get("pid_namespace", "")),
        heartbeat=stat.st_mtime,
        file_id=(stat.st_dev, stat.st_ino, stat.st_mtime_ns),
    )


def _parse_record(content: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(content)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def stale_reason(holder: LockHolder, now: float | None = None) -> str | None:
    """Why ``holder``'s lock is stale, or None while its holder may be alive.

    >>> old = LockHolder("elsewhere", 42, "?", "", "t", "", heartbeat=1000.0, file_id=(0, 0, 0))
    >>> stale_reason(old, now=1000.0 + STALE_AFTER_S + 1)
    'no heartbeat for 121 s (stale after 120 s)'
    >>> stale_reason(old, now=1010.0) is None  # another host, fresh heartbeat: alive as far as we can tell
    True
    """
    age = (time.time() if now is None else now) - holder.heartbeat
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    host, namespace = this_host()
    same_pid_space = holder.host == host and (holder.pid_namespace == namespace or not holder.pid_namespace)
    if holder.pid is None or not same_pid_space or held_by_this_process(holder):
        return None
    if holder.pid == os.getpid():
        return f"it names pid {holder.pid}, this very process, which did not write it (a reused pid)"
    if not pid_alive(holder.pid):
        return f"pid {holder.pid} is no longer running on {host}"
    return None


def held_by_this_process(holder: LockHolder) -> bool:
    """Whether ``holder`` is a lock this process acquired and still holds."""
    mine = _HELD_HERE.get(holder.token)
    return mine is not None and mine.owner_pid == os.getpid()


def in_use_message(path: Path, holder: LockHolder) -> str:
    """The one-line refusal for a launch that finds ``path`` held by a live ``holder``."""
    age = max(0.0, time.time() - holder.heartbeat)
    return (
        f"output_dir {path.parent} is in use by another launch: {holder.describe()} "
        f"(lock file {path}, heartbeat {age:.0f} s ago). Wait for that run to finish; if you are sure it is gone, "
        f"delete {path} and relaunch (a relaunch takes over a lock whose heartbeat is over {STALE_AFTER_S:.0f} s "
        "old by itself)"
    )


def check_not_held(path: Path) -> None:
    """Raise :class:`ConfigError` naming the holder when a live process other than this one holds ``path``.

    Reads only: a stale lock passes (the launch that goes on to lock takes it over).
    """
    holder = read_holder(path)
    if holder is not None and not held_by_this_process(holder) and stale_reason(holder) is None:
        raise ConfigError(in_use_message(path, holder))


def take_over(path: Path, stale: LockHolder) -> bool:
    """Remove the stale lock file ``stale`` was read from; False when it is no longer at ``path``.

    The file is renamed aside first: of two launches taking over the same stale lock, only one
    rename finds it. If the file moved is not the one judged stale (another launch already took
    over and locked, or the holder refreshed its heartbeat after all), it is put back and False
    returned: the caller then re-reads the lock.
    """
    aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(6)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    stat = os.stat(aside)
    if (stat.st_dev, stat.st_ino, stat.st_mtime_ns) == stale.file_id:
        os.unlink(aside)
        return True
    try:
        os.link(aside, path)  # unlike a rename back, never replaces a lock created meanwhile
    except FileExistsError:
        logger.error("lock %s changed hands twice while being taken over; the launch that held it loses it", path)
    except OSError:  # a filesystem without hard links: a rename back, if nothing took the place meanwhile
        if not path.exists():
            os.rename(aside, path)
            return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    return False


class OutputDirLock:
    """An exclusive lock held through the lock file at ``path`` (see the module docstring).

    Constructing it locks nothing: :meth:`acquire` does, :meth:`release` undoes it (and does
    nothing on a lock never acquired, already released or held by the parent of a forked process).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / LOCK_FILE
    >>> lock = OutputDirLock(path).acquire(run_id="r1")
    >>> holder = read_holder(path)
    >>> holder.pid == os.getpid(), holder.run_id, lock.held
    (True, 'r1', True)
    >>> lock.release(); lock.release(); path.exists()
    False
    """

    def __init__(self, path: Path, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.record: dict[str, Any] = {}
        self.owner_pid: int | None = None
        self._fd: int | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()

    @property
    def held(self) -> bool:
        """Whether this handle holds the lock (acquired, not released, not lost to a takeover)."""
        return self._fd is not None and self.owner_pid == os.getpid() and self._is_still_ours()

    def acquire(self, run_id: str = "") -> OutputDirLock:
        """Take the lock, taking a stale one over with a warning; returns ``self``.

        Raises :class:`ConfigError` naming the holder when a live process holds it. A lock this
        process already holds (the same output dir opened again) is handed over to this handle.
        """
        if self._fd is not None:
            return self
        for _ in range(ACQUIRE_ATTEMPTS):
            if self._create(run_id):
                return self
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile
            if held_by_this_process(holder):
                logger.debug("%s: re-opened by this process; the new handle takes the lock over", self.path)
                _HELD_HERE[holder.token].release()
                continue
            reason = stale_reason(holder)
            if reason is None:
                raise ConfigError(in_use_message(self.path, holder))
            if take_over(self.path, holder):
                logger.warning("taking over the stale lock %s of %s: %s", self.path, holder.describe(), reason)
        raise ConfigError(
            f"could not lock {self.path}: it changed hands {ACQUIRE_ATTEMPTS} times while this launch tried; "
            "is another launch starting in the same output_dir?"
        )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still this handle's; idempotent."""
        if self.owner_pid != os.getpid():
            return
        self._stop.set()
        with self._mutex:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if self._is_ours(fd):
                    self.path.unlink()
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        _HELD_HERE.pop(self.record.get("token", ""), None)
        atexit.unregister(self.release)
        logger.debug("released %s", self.path)

    def _create(self, run_id: str) -> bool:
        """Create the lock file exclusively with this process's record; False when it exists."""
        host, namespace = this_host()
        token = secrets.token_hex(8)
        record: dict[str, Any] = {
            "host": host,
            "pid": os.getpid(),
            "pid_namespace": namespace,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "run_id": run_id,
            "token": token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise ConfigError(f"cannot create the output dir lock {self.path} ({error.strerror or error})") from error
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink()
            raise
        self._fd, self.record, self.owner_pid = fd, record, os.getpid()
        self._stop = threading.Event()
        _HELD_HERE[token] = self
        atexit.register(self.release)
        threading.Thread(target=self._beat, name=f"lock heartbeat {self.path}", daemon=True).start()
        logger.info("locked %s (pid %d)", self.path, record["pid"])
        return True

    def _beat(self) -> None:
        """Refresh the file's mtime until released; stop with an error if another launch took it over."""
        while not self._stop.wait(self.heartbeat_interval_s):
            with self._mutex:
                if self._fd is None:
                    return
                try:
                    os.utime(self._fd)  # the file this handle created, even if renamed aside
                    ours = self._is_ours(self._fd)
                except OSError as error:
                    logger.warning("heartbeat of %s failed: %s", self.path, error)
                    continue
            if not ours:
                logger.error(
                    "lost the lock %s: another launch took it over (this process missed heartbeats for over "
                    "%.0f s?); two runs may now be writing to %s",
                    self.path,
                    STALE_AFTER_S,
                    self.path.parent,
                )
                return

    def _is_still_ours(self) -> bool:
        with self._mutex:
            return self._fd is not None and self._is_ours(self._fd)

    def _is_ours(self, fd: int) -> bool:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)


# The locks this process holds, by token: a process that opens the same output dir again takes its
# own lock over instead of being refused by it. Handles leave it on release.
_HELD_HERE: dict[str, OutputDirLock] = {}
