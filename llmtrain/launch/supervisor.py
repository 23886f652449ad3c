"""The launcher's flow: plan, record, start, supervise, and end with one ``launch: ...`` line saying what happened.

1. The plan (:mod:`llmtrain.launch.plan`): variables, topology, run config (a credential as a flag or
   key refused), output dir, lock. Any problem is one ``launch: ...`` line on stderr and exit 2, with
   nothing written. ``DRY_RUN=1`` prints the plan and stops here.
2. The record: ``<output_dir>/logs/launch-<time>-node<N>.sh`` (the command) and ``.log`` (everything
   the console shows, as it came), the control directory (:mod:`llmtrain.supervision`).
3. Each attempt: the job starts (:mod:`llmtrain.launch.job`), the preflight runs beside it on the
   first one (:mod:`llmtrain.launch.preflight`), and the loop below watches signals, deadlines and,
   under ``NNODES``, the other nodes (:mod:`llmtrain.launch.peers`) until every local process of the
   job has ended. The ranks' exit codes are read from the control directory.
4. The end: exit 0, 2 (bad input), 3 (non-finite loss) and 75 (stopped after saving) are final; a
   crash is restarted, resuming, up to ``MAX_RESTARTS`` times while each attempt leaves a newer
   complete checkpoint behind (:mod:`llmtrain.launch.progress`), and under ``NNODES`` only while
   every other node's launcher is alive.

Stops: the first SIGTERM, SIGINT or SIGHUP writes ``stop`` to the control file: every rank, on
every host, finishes its step, saves a complete checkpoint and exits 75 (agreed across ranks by
:class:`llmtrain.run.guards.StepGuardCallback`); the launcher exits 75 and names the step. After
``PREEMPT_GRACE_S`` seconds, or at a second SIGINT (exit 130), it writes ``kill`` and SIGKILLs every
local process of the job.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from types import FrameType

from llmtrain.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserInputError,
)
from llmtrain.launch.console import Console, ConsoleHandler
from llmtrain.launch.job import Job, become_subreaper
from llmtrain.launch.peers import PeerLoss, PeerWatch
from llmtrain.launch.plan import LOG_DIR, Plan, check_output_dir, make_plan, shell_word, shown
from llmtrain.launch.preflight import Preflight
from llmtrain.launch.progress import Progress, describe_step, newest_complete_step, resume_text
from llmtrain.launch.remote_env import runner_environment, write_remote_env
from llmtrain.run.lock import LOCK_FILE, check_not_held
from llmtrain.supervision import (
    BEAT_S,
    CONTROL_DIR_VARIABLE,
    ENDED,
    FAILED,
    KILL,
    PREFLIGHT,
    RUN,
    STOP,
    ControlWriter,
    new_record,
    read_control,
    read_exit_codes,
)

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.2  # the loop's tick: signals, deadlines and the preflight's verdict are acted on within it
CONTROL_ROOT = ".control"  # under <output_dir>/logs: one directory per launch and node
# Remote ranks read `kill` within a beat and SIGKILL themselves; their launch.py, ssh and pdsh then end.
REMOTE_KILL_WAIT_S = 3 * BEAT_S + 2
# A node's launcher counts as alive before a restart when it has beaten this recently.
RECENT_BEAT_S = 3 * BEAT_S
USAGE = "launch: usage: python -m llmtrain.launch ENTRY.py [config.yaml] [--key value ...]"


def main(argv: list[str]) -> int:
    """Launch ``ENTRY.py`` with its arguments (module docstring); returns the exit code."""
    if not argv:
        sys.stderr.write(USAGE + "\n")
        return USER_ERROR_EXIT_CODE
    entry, *user_args = argv
    env, cwd = dict(os.environ), Path.cwd()
    try:
        plan = make_plan(entry, user_args, env, cwd)
        if not plan.settings.dry_run:
            check_output_dir(plan.output_dir)
            if plan.settings.node_rank == 0 or plan.settings.hostfile:
                # Only where the main process runs: another node's launcher would take a crashed main
                # process's lock (another host, heartbeat still fresh) for a live launch.
                check_not_held(plan.output_dir / LOCK_FILE)
    except UserInputError as error:
        sys.stderr.write(f"launch: {error}\n")
        return USER_ERROR_EXIT_CODE
    if plan.settings.dry_run:
        return dry_run(plan, env, cwd)
    return Launcher(plan, env, cwd).run()


def dry_run(plan: Plan, env: dict[str, str], cwd: Path) -> int:
    """Print the topology, the exports and the command, start nothing (under HOSTFILE, write the env file it names)."""
    env_file = write_env_file(plan, env, cwd) if plan.settings.hostfile else None
    lines = [f"dry run: {plan.topology.describe()}"]
    if plan.exports:
        lines.append("dry run: exports " + " ".join(f"{name}={value}" for name, value in plan.exports.items()))
    command = shown(plan.command(env_file))
    lines.append("dry run: command: " + " ".join(shell_word(word) for word in command))
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def write_env_file(plan: Plan, env: dict[str, str], cwd: Path) -> Path:
    """Under ``HOSTFILE``: write the remote ranks' env file (:mod:`llmtrain.launch.remote_env`), say what it holds.

    The credentials it leaves out are named only with two or more hosts: with one, DeepSpeed's runner
    starts the ranks itself, and they inherit the launcher's environment.
    """
    remote = write_remote_env(env, cwd, os.getpid())
    for name in remote.skipped:
        sys.stderr.write(
            f"launch: {name} is not passed to the remote ranks: its value spans lines (the env file holds one "
            "per line)\n"
        )
    withheld = remote.withheld_line()
    if withheld is not None and plan.topology.hosts > 1:
        sys.stderr.write(withheld + "\n")
    sys.stdout.write(remote.summary() + "\n")
    sys.stdout.flush()
    return remote.path


def remove_ended_controls(root: Path, node_rank: int) -> None:
    """Delete the control directories of this node's earlier launches that have ended.

    An ended launch keeps its directory (state ``ended``) so that a rank of it starting late reads
    that and does not train; the next launch on the node clears it away.
    """
    for directory in root.glob(f"node{node_rank}-*"):
        record = read_control(directory)
        if record is not None and record.state == ENDED:
            shutil.rmtree(directory, ignore_errors=True)


class Launcher:
    """One launch, from its record to its exit code (module docstring)."""

    def __init__(self, plan: Plan, env: dict[str, str], cwd: Path) -> None:
        self.plan = plan
        self.settings = plan.settings
        self.env = env
        self.cwd = cwd
        self.output_dir = plan.output_dir
        self.signals: collections.deque[int] = collections.deque()
        self.wake = threading.Event()
        self.stop_signal: str | None = None  # the first stop signal's name (TERM, INT, HUP)
        self.stop_deadline: float | None = None
        self.killed = False
        self.aborted = False
        self.early_exit: int | None = None
        self.node_loss: PeerLoss | None = None
        self.reported_nodes: set[int] = set()
        self.peer_end_deadline: float | None = None
        self.preflight: Preflight | None = None
        self.console: Console | None = None
        self.control: ControlWriter | None = None
        self.peers: PeerWatch | None = None
        self.env_file: Path | None = None
        self.job: Job | None = None

    # --- the launch as a whole -------------------------------------------------------------------

    def run(self) -> int:
        code = 1
        try:
            code = self._run()
        finally:
            self._clean_up(code)
        return code

    def _run(self) -> int:
        s = self.settings
        log_dir = self.output_dir / LOG_DIR
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-node{s.node_rank}"
        log_path = (log_dir / f"launch-{stamp}.log").absolute()
        state = RUN if s.skip_doctor else PREFLIGHT
        record = new_record(s.node_rank, s.node_timeout_s, s.preempt_grace_s, state=state, log=str(log_path))
        control_dir = (log_dir / CONTROL_ROOT / f"node{s.node_rank}-{record.launch_id}").absolute()
        job_env = {**self.env, **self.plan.exports, "PYTHONUNBUFFERED": "1", CONTROL_DIR_VARIABLE: str(control_dir)}
        if s.hostfile:
            self.env_file = write_env_file(self.plan, job_env, self.cwd)
            if self.plan.topology.hosts > 1:
                job_env = runner_environment(job_env)
        command = self.plan.command(self.env_file)
        shown_command = shown(command)

        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"launch-{stamp}.sh").write_text(" ".join(shell_word(word) for word in shown_command) + " \n")
        console = self.console = Console()
        console.open_log(log_path)
        self._log_to(console)
        console.say("launch: " + " ".join(shown_command))
        console.say(f"log: {log_path}", log=False)

        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        become_subreaper()
        remove_ended_controls(log_dir / CONTROL_ROOT, s.node_rank)
        self.control = ControlWriter(control_dir, record).open()
        if s.multi_node == "nnodes":
            self.peers = PeerWatch(log_dir / CONTROL_ROOT, s.node_rank, s.nnodes, control_dir)
        if not s.skip_doctor:
            console.hold_job_output()
        return self._attempts(command, job_env, control_dir)

    def _attempts(self, command: list[str], job_env: dict[str, str], control_dir: Path) -> int:
        assert self.control is not None and self.console is not None
        restarts = 0
        attempt = 0
        while True:
            attempt += 1
            self._handle_signals()
            if self.stop_signal is not None:
                return self._conclude_stop(None, Progress.before_attempt(self.output_dir))
            self.control.update(attempt=attempt, **({} if attempt == 1 else {"state": RUN, "signal": ""}))
            self.stop_deadline, self.killed = None, False
            progress = Progress.before_attempt(self.output_dir)
            self.job = Job(command, job_env, self.console.pump, self.plan.job_dies_with_launcher).start()
            if attempt == 1 and not self.settings.skip_doctor:
                self.preflight = Preflight(self.settings.stage, self.plan.args, self.console).start()
            self._supervise(self.job)
            if self.early_exit is not None:
                return self.early_exit
            self._handle_signals()
            status = self._status(self.job.status, read_exit_codes(control_dir, attempt))
            decided = self._conclude(status, progress)
            if decided is not None:
                return decided
            step, new = progress.after_attempt()
            if not new:
                self._say(
                    f"launch: exit {status} with no new complete checkpoint since this attempt began "
                    f"(newest: {describe_step(step)}); not retrying"
                )
                return status
            if restarts >= self.settings.max_restarts:
                self._say(
                    f"launch: exit {status}; giving up after {restarts} restart(s) (MAX_RESTARTS="
                    f"{self.settings.max_restarts})"
                )
                return status
            if self.peers is not None and not self._peers_ready():
                self._handle_signals()
                if self.stop_signal is not None:
                    return self._conclude_stop(status, progress)
                return self._conclude_node_loss(status, progress)
            restarts += 1
            self._say(
                f"launch: exit {status}; restart {restarts}/{self.settings.max_restarts} resumes from step {step}"
            )

    @staticmethod
    def _status(job_status: int, rank_codes: dict[int, int]) -> int:
        """The run's exit code: the job's, or the ranks' own where the launchers in between report another.

        torchrun exits 1 whatever its workers' codes; DeepSpeed's per-node ``launch.py`` exits with the
        first failing rank's code, but 1 when it was itself signalled, and its runner (under ``HOSTFILE``)
        passes that on, or dies (143) when it is signalled. When the ranks that recorded a code agree on one
        of ours (2, 3, 75), that is the run's.

        >>> Launcher._status(1, {0: 75, 1: 75}), Launcher._status(143, {0: 75}), Launcher._status(247, {0: 1})
        (75, 75, 247)
        """
        if job_status in (0, USER_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE):
            return job_status
        codes = {code for code in rank_codes.values() if code != 0}
        if len(codes) == 1 and (code := codes.pop()) in (USER_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE):
            return code
        return job_status

    def _conclude(self, status: int, progress: Progress) -> int | None:
        """The exit code when this attempt ends the launch, having said why; None when a restart may follow."""
        if self.aborted:
            step = newest_complete_step(self.output_dir)
            self._say(
                f"launch: aborted by a second SIGINT (exit 130); the newest complete checkpoint is "
                f"{describe_step(step)}"
            )
            return 130
        if self.stop_signal is not None:
            return self._conclude_stop(status, progress)
        if self.node_loss is not None and status != 0:
            return self._conclude_node_loss(status, progress)
        if status == 0:
            return 0
        if status == USER_ERROR_EXIT_CODE:
            self._say("launch: bad input or configuration (exit 2); not retrying")
            return status
        if status == DIVERGED_EXIT_CODE:
            self._say("launch: non-finite loss or gradients (exit 3); not retrying")
            return status
        if status == PREEMPTED_EXIT_CODE:
            step = newest_complete_step(self.output_dir)
            self._say(
                f"launch: the ranks stopped on a signal after saving a complete checkpoint ({describe_step(step)}) "
                "(exit 75); not retrying: rerun the same command to resume"
            )
            return status
        if status in (128 + signal.SIGHUP, 128 + signal.SIGINT, 128 + signal.SIGTERM):
            # DeepSpeed's launcher or torchrun was itself stopped by a signal: a stop request, not a crash.
            name = signal.Signals(status - 128).name
            step = newest_complete_step(self.output_dir)
            self._say(
                f"launch: the job was stopped by {name} (exit {status}), not by this launcher; not retrying: "
                f"rerun the same command to resume from the newest complete checkpoint ({describe_step(step)})"
            )
            return status
        return None

    def _conclude_stop(self, status: int | None, progress: Progress) -> int:
        step, new = progress.after_attempt()
        name = f"SIG{self.stop_signal}"
        if status == PREEMPTED_EXIT_CODE and new:
            self._say(
                f"launch: stopped on {name} after saving a complete checkpoint ({describe_step(step)}) (exit 75); "
                "rerun the same command to resume"
            )
        elif status is None or status == PREEMPTED_EXIT_CODE:
            self._say(
                f"launch: stopped on {name} before any rank trained past the newest complete checkpoint "
                f"({describe_step(step)}) (exit 75); rerun the same command to resume"
            )
        else:
            self._say(
                f"launch: stopped on {name}; the ranks ended with exit {status} before saving (exit 75); rerun the "
                f"same command to resume from the newest complete checkpoint ({describe_step(step)})"
            )
        return PREEMPTED_EXIT_CODE

    def _conclude_node_loss(self, status: int, progress: Progress) -> int:
        loss = self.node_loss
        node = f"node {loss.node}" if loss is not None else "a node"
        step, new = progress.after_attempt()
        if status == PREEMPTED_EXIT_CODE and new:
            self._say(
                f"launch: {node} was lost; every rank saved a complete checkpoint ({describe_step(step)}) (exit 75): "
                f"rerun the same command on every node once {node} is back"
            )
            return status
        self._say(
            f"launch: exit {status} after {node} was lost; not restarting: rerun the same command on every node "
            f"once {node} is back ({resume_text(step)})"
        )
        return status or 1

    def _clean_up(self, code: int) -> None:
        if self.job is not None and not self.job.ended():
            self.job.kill()
        if self.control is not None:
            self.control.close(code)
        if self.env_file is not None:
            with suppress(OSError):
                self.env_file.unlink()
        if self.console is not None:
            self.console.close()

    # --- one attempt -----------------------------------------------------------------------------

    def _supervise(self, job: Job) -> None:
        """Watch ``job`` until every local process of it has ended, and the preflight has given its verdict."""
        while not job.ended() or self.preflight is not None:
            self._handle_signals(job)
            if self.early_exit is not None:
                return
            self._check_preflight(job)
            if self.early_exit is not None:
                return
            now = time.monotonic()
            if self.stop_deadline is not None and now > self.stop_deadline and not self.killed:
                if self.node_loss is not None:
                    within = f"NODE_TIMEOUT_S={self.settings.node_timeout_s}s of losing node {self.node_loss.node}"
                else:
                    within = f"PREEMPT_GRACE_S={self.settings.preempt_grace_s}s"
                self._say(f"launch: the ranks did not stop within {within}; killing them")
                self._kill(job)
            if job.top_exited() and self.stop_deadline is None and self.preflight is None:
                # The job's top process is gone but some of its processes are not: ask them to stop too.
                self._request_stop(None)
            if self.peers is not None:
                self._watch_peers(job, now)
            job.reap_orphans()
            self.wake.wait(POLL_S)
            self.wake.clear()

    def _check_preflight(self, job: Job) -> None:
        if self.preflight is None or not self.preflight.done():
            return
        assert self.console is not None and self.control is not None
        status = self.preflight.status or 0
        self.preflight = None
        if status == 0:
            if self.stop_signal is None:
                self.control.update(state=RUN)
            self.console.release_job_output()
            return
        self.console.release_job_output(to_console=False)
        self.control.update(state=FAILED)
        job.kill()
        self._say(
            f"launch: preflight failed (exit {status}); fix the ERROR lines above (SKIP_DOCTOR=1 skips the check)"
        )
        self.early_exit = status

    def _request_stop(self, signal_name: str | None) -> None:
        """Ask every rank to save and stop, and start the grace period."""
        assert self.control is not None
        if self.control.record.state not in (STOP, KILL):
            self.control.update(state=STOP, signal=signal_name or "")
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.settings.preempt_grace_s

    def _kill(self, job: Job) -> None:
        """End every rank now: ``kill`` for the remote ones, SIGKILL for every local process of the job."""
        assert self.control is not None
        self.killed = True
        self.control.update(state=KILL)
        if self.settings.hostfile:
            job.wait_ended(REMOTE_KILL_WAIT_S)
        job.kill()

    # --- signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        self.wake.set()

    def _handle_signals(self, job: Job | None = None) -> None:
        while self.signals:
            signum = self.signals.popleft()
            name = signal.Signals(signum).name.removeprefix("SIG")
            if self.preflight is not None and job is not None:
                # Before the preflight's verdict no rank has begun: nothing to save.
                assert self.control is not None
                self._say(f"launch: SIG{name} before training started; stopping")
                self.control.update(state=STOP, signal=f"SIG{name}")
                job.kill()
                self.early_exit = 128 + signum
                return
            if self.stop_signal is not None:
                if signum == signal.SIGINT and not self.aborted and job is not None:
                    self.aborted = True
                    self._say("launch: second SIGINT: killing every rank now")
                    self._kill(job)
                continue
            self.stop_signal = name
            self._say(
                f"launch: SIG{name}: every rank saves a complete checkpoint after its current step, then stops "
                f"(up to PREEMPT_GRACE_S={self.settings.preempt_grace_s}s; a second Ctrl-C aborts)"
            )
            self._request_stop(f"SIG{name}")

    # --- other nodes (NNODES) ----------------------------------------------------------------------

    def _watch_peers(self, job: Job, now: float) -> None:
        assert self.peers is not None
        timeout = self.settings.node_timeout_s
        self.peers.poll(now)
        for loss in self.peers.losses(now, timeout):
            if loss.node in self.reported_nodes:
                continue
            if loss.ended:
                # Its ranks may have finished or stopped with ours: give this node's job time to end by itself.
                if job.top_exited():
                    continue
                self.peer_end_deadline = self.peer_end_deadline or now + timeout
                if now < self.peer_end_deadline:
                    continue
            self.reported_nodes.add(loss.node)
            self.node_loss = self.node_loss or loss
            self._say(loss.line(timeout))
            self._request_stop(f"node {loss.node} was lost")
            # Without that node the ranks cannot agree on a save: they get NODE_TIMEOUT_S, not PREEMPT_GRACE_S.
            self.stop_deadline = min(self.stop_deadline or now + timeout, now + timeout)
            if loss.ended and not self.killed:
                self._kill(job)

    def _peers_ready(self) -> bool:
        """Before a restart: wait until every other node's launcher is seen alive; False (said why) when one is lost."""
        assert self.peers is not None
        timeout = self.settings.node_timeout_s
        deadline = time.monotonic() + timeout + BEAT_S
        while time.monotonic() < deadline and not self.signals:
            now = time.monotonic()
            self.peers.poll(now)
            losses = self.peers.losses(now, timeout)
            if losses:
                self.node_loss = losses[0]
                self._say(losses[0].line(timeout))
                return False
            if self.peers.all_alive(now, RECENT_BEAT_S):
                return True
            time.sleep(BEAT_S / 2)
        return not self.signals and self.peers.all_alive(time.monotonic(), RECENT_BEAT_S)

    # --- output ------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.say(text)
        else:
            sys.stdout.write(text + "\n")

    @staticmethod
    def _log_to(console: Console) -> None:
        """Log records of this process (the preflight's) to the console and the launch log."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(ConsoleHandler(console))
        root.setLevel(logging.INFO)
        # DeepSpeed probes for libaio with a test compile at import; its gcc lines are not ours to show.
        logging.getLogger("compilers").setLevel(logging.WARNING)
