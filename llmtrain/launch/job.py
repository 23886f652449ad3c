"""One attempt of the job as local processes: started, its output pumped, its exit code read, and killed to the last.

The job (DeepSpeed's per-node launcher or runner, or torchrun, and whatever they start) runs in a
session of its own, so a signal to the launcher's process group (``scancel``, ``timeout``, Ctrl-C)
reaches the launcher alone, which then stops the ranks the way it chooses. Two kernel features keep the job from
outliving the launcher on this host:

* DeepSpeed's runner and torchrun get ``PR_SET_PDEATHSIG`` (SIGTERM when the launcher dies, even by
  SIGKILL; not DeepSpeed's per-node launcher, see :attr:`llmtrain.launch.plan.Plan.job_dies_with_launcher`);
* the launcher is a child subreaper (``PR_SET_CHILD_SUBREAPER``): processes orphaned inside the
  job (torchrun's workers, DeepSpeed's ``launch.py`` after its runner died, the ranks after a
  ``launch.py`` died) become its children, so every local process of the job is a descendant of the
  launcher, and killing the job kills them all.

The job's stdout and stderr are one pipe; the job has ended when its top process has exited and
every process holding the pipe has closed it (the ranks, their data loader workers, pdsh and ssh).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import psutil

from llmtrain.launch.console import read_chunks

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)
PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT_S = 10.0  # SIGKILLed processes are gone within milliseconds; this only bounds a stuck kernel


def _find_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, here: the forked child only calls it (no dynamic loading between fork and exec).
_PRCTL = _find_prctl()


def _prctl(option: int, value: int) -> bool:
    return _PRCTL is not None and int(_PRCTL(option, value, 0, 0, 0)) == 0


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux); False where not supported."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _die_with_launcher() -> None:
    """In the forked child, before exec: SIGTERM when the launcher (its parent) dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N for a process killed by signal N.

    >>> exit_status(-15), exit_status(247), exit_status(0)
    (143, 247, 0)
    """
    return 128 - returncode if returncode < 0 else returncode


class Job:
    """The job's processes on this host (module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        pump: Callable[[Iterable[bytes]], None],
        dies_with_launcher: bool = True,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.dies_with_launcher = dies_with_launcher
        self._pump = pump
        self.process: subprocess.Popen[bytes] | None = None
        self._pumping: threading.Thread | None = None

    def start(self) -> Job:
        # From the main thread: the parent-death signal follows the thread that forked, not the process.
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_launcher if self.dies_with_launcher else None,
        )
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        self._pumping = threading.Thread(target=self._pump, args=(read_chunks(descriptor),), name="job output")
        self._pumping.daemon = True
        self._pumping.start()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def top_exited(self) -> bool:
        """Whether the job's top process (DeepSpeed's per-node launcher or runner, or torchrun) has exited."""
        return self.process is not None and self.process.poll() is not None

    def ended(self) -> bool:
        """Whether the top process has exited and the output pipe is closed by every process of the job."""
        return self.top_exited() and self._pumping is not None and not self._pumping.is_alive()

    @property
    def status(self) -> int:
        """The top process's exit status (shell numbering)."""
        assert self.process is not None and self.process.returncode is not None
        return exit_status(self.process.returncode)

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the launcher: the job's, orphans included (the launcher is a subreaper)."""
        try:
            return [child for child in psutil.Process().children(recursive=True) if _running(child)]
        except psutil.Error:
            return []

    def reap_orphans(self) -> None:
        """Collect orphans of the job that ended as the launcher's children (never the top process: Popen does)."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                if self.process is not None and child.pid == self.process.pid:
                    continue
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(child.pid, os.WNOHANG)

    def kill(self) -> None:
        """SIGKILL every local process of the job, and wait until none is left and the output has ended."""
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            alive = self.descendants()
            if not alive:
                break
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            self.reap_orphans()
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.1)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self._pumping is not None:
            self._pumping.join(timeout=max(0.1, deadline - time.monotonic()))

    def wait_ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`ended`."""
        deadline = time.monotonic() + timeout
        while not self.ended() and time.monotonic() < deadline:
            self.reap_orphans()
            time.sleep(0.05)
        return self.ended()


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
