"""The launcher's parts in process: plan and command, topology, the control channel, peers, progress, console.

A rank under a launcher's control as a real process: ``tests/integration/test_rank_supervision.py``; real
launches: ``tests/integration/test_launch_topology.py`` (dry runs) and ``tests/distributed/``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llmtrain import supervision
from llmtrain.errors import ConfigError, TrainingPreempted
from llmtrain.launch.console import Console
from llmtrain.launch.peers import PeerWatch
from llmtrain.launch.plan import DEFAULT_NODE_TIMEOUT_S, Plan, make_plan, shell_word, shown
from llmtrain.launch.progress import COMPLETE_MARKER, Progress
from llmtrain.launch.supervisor import Launcher, remove_ended_controls
from llmtrain.paths import PROJECT_ROOT
from llmtrain.run import checkpoints
from llmtrain.supervision import (
    CONTROL_DIR_VARIABLE,
    ENDED,
    FAILED,
    PREFLIGHT,
    STOP,
    ControlRecord,
    ControlWriter,
    PreflightRefused,
    Silence,
    new_record,
    read_control,
    read_exit_codes,
)
from llmtrain.topology import launch_topology

NO_SUCH_PID = 4_194_305  # above the kernel's PID_MAX_LIMIT


def plan_for(tmp_path: Path, *args: str, **env: str) -> Plan:
    return make_plan(
        "pretrain.py", ["--output_dir", str(tmp_path / "out"), *args], {"PATH": "/nonexistent", **env}, tmp_path
    )


# --- plan and command ----------------------------------------------------------------------------


def test_cpu_ranks_get_use_cpu_and_a_share_of_the_cores(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, NPROC="2", PYTHON="py")
    command = plan.command()
    assert command[:4] == ["py", "-u", "-m", "deepspeed.launcher.launch"]  # DeepSpeed's per-node launcher
    assert json.loads(base64.urlsafe_b64decode(command[4].removeprefix("--world_info="))) == {"localhost": [0, 1]}
    assert command[command.index(str(PROJECT_ROOT / "pretrain.py")) + 1 :] == [
        "--deepspeed", str(PROJECT_ROOT / "ds_config_zero2.json"), "--use_cpu", "true", "--output_dir",
        str(tmp_path / "out"),
    ]  # fmt: skip
    assert int(plan.exports["OMP_NUM_THREADS"]) >= 1


def test_the_dry_run_says_cpu_ranks_whenever_they_are_cpu_ranks(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=2\nb slots=2\n")
    gpu = plan_for(tmp_path, HOSTFILE=str(hostfile))
    assert gpu.topology.describe() == "gpus=4 ranks=4 gpus_from=HOSTFILE hosts=2 (4 GPU rank(s))"
    for cpu in (
        plan_for(tmp_path, HOSTFILE=str(hostfile), NPROC="1"),
        plan_for(tmp_path, "--use_cpu", "true", HOSTFILE=str(hostfile)),
    ):
        assert cpu.topology.describe() == "gpus=0 ranks=4 gpus_from=HOSTFILE hosts=2 (4 CPU rank(s) on gloo)"
        assert cpu.command().count("--use_cpu") == 1
    config = tmp_path / "cpu.yaml"
    config.write_text("use_cpu: true\n")
    from_yaml = make_plan("pretrain.py", [str(config)], {"HOSTFILE": str(hostfile), "PATH": "/x"}, tmp_path)
    assert from_yaml.topology.gpus == 0 and "--use_cpu" not in from_yaml.args


def test_nnodes_needs_master_addr_and_a_node_rank_below_nnodes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NNODES=2 needs MASTER_ADDR"):
        plan_for(tmp_path, NNODES="2")
    with pytest.raises(ConfigError, match="NODE_RANK=2 must be below NNODES=2"):
        plan_for(tmp_path, NNODES="2", NODE_RANK="2", MASTER_ADDR="h")
    with pytest.raises(ConfigError, match="NODE_TIMEOUT_S='soon' must be a whole number of seconds"):
        plan_for(tmp_path, NODE_TIMEOUT_S="soon")


def test_the_default_node_timeout_reports_a_lost_node_within_a_minute() -> None:
    assert int(DEFAULT_NODE_TIMEOUT_S) + supervision.BEAT_S <= 60


def test_recorded_commands_hide_secrets() -> None:
    command = shown(["python", "x.py", "--hub_token", "hf_1", "--run_name", "a b$c"])
    assert [shell_word(word) for word in command][2:] == ["--hub_token", "\\*\\*\\*", "--run_name", "a\\ b\\$c"]


def test_topology_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^NUM_GPUS=5 but CUDA_VISIBLE_DEVICES='4,5,6,7' lists 4 GPU\(s\)$"):
        launch_topology({"NUM_GPUS": "5", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    with pytest.raises(ConfigError, match=r"^NPROC must be at least 1$"):
        launch_topology({"NPROC": "0", "PATH": "/nonexistent"})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\na slots=2\n")
    with pytest.raises(ConfigError, match=f"^HOSTFILE={hostfile} lists host a twice$"):
        launch_topology({"HOSTFILE": str(hostfile)})


# --- the control channel ---------------------------------------------------------------------------


def test_the_control_file_beats_and_keeps_its_last_state_when_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervision, "BEAT_S", 0.02)
    directory = tmp_path / "control"
    writer = ControlWriter(directory, new_record(0, 30, 600, state=PREFLIGHT)).open()
    try:
        first = read_control(directory)
        assert first is not None and first.state == PREFLIGHT
        writer.update(state=STOP, signal="SIGTERM")
        record = read_control(directory)
        assert record is not None and (record.state, record.signal) == (STOP, "SIGTERM")
        time.sleep(0.2)
        later = read_control(directory)
        assert later is not None and later.beat > first.beat
    finally:
        writer.close(75)
    ended = read_control(directory)
    assert ended is not None and (ended.state, ended.exit_code) == (ENDED, 75)
    remove_ended_controls(tmp_path, 0)  # another node's or name: untouched
    assert directory.is_dir()


def test_a_rank_stops_on_a_stop_request_a_gone_launcher_or_a_silent_one(tmp_path: Path) -> None:
    record = new_record(0, 30, 600)
    link = supervision._RankLink(tmp_path, 0, record)
    assert link.why_stop() is None
    link.record = replace(record, state=STOP, signal="SIGINT")
    assert link.why_stop() == "the launcher asks every rank to stop (it received SIGINT)"
    link.record = replace(record, pid=NO_SUCH_PID)
    assert "is no longer running" in (link.why_stop() or "")
    link.record = replace(record, host="another-host")  # no pid to check: only the heartbeat tells
    link.silence.since = time.monotonic() - 31
    assert "no heartbeat from the launcher" in (link.why_stop() or "")


def test_silence_counts_from_the_last_change_of_the_beat() -> None:
    silence, record = Silence(), new_record(0, 30, 600)
    silence.observe(None, now=10.0)
    assert silence.seconds(now=15.0) == 5.0
    silence.observe(record, now=20.0)
    silence.observe(replace(record, state=STOP), now=25.0)  # a new state, the same beat: still silent
    assert silence.seconds(now=26.0) == 6.0


def rank_env(directory: Path) -> dict[str, str]:
    return {CONTROL_DIR_VARIABLE: str(directory), "RANK": "1"}


def test_a_rank_waits_for_the_preflight_and_does_not_start_when_it_fails(tmp_path: Path) -> None:
    writer = ControlWriter(tmp_path, new_record(0, 30, 600, state=FAILED)).open()
    try:
        with pytest.raises(PreflightRefused):
            supervision.attach_rank(rank_env(tmp_path))
        writer.update(state=STOP, signal="SIGTERM")
        with pytest.raises(TrainingPreempted, match="before training started"):
            supervision.attach_rank(rank_env(tmp_path))
    finally:
        writer.close(2)
    assert supervision._LINK is None


def test_outside_a_launch_or_without_the_control_file_a_rank_runs_unsupervised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supervision.attach_rank({})
    supervision.attach_rank(rank_env(tmp_path / "not-shared"))
    assert supervision._LINK is None
    assert "cannot be read from this host: this rank runs unsupervised" in caplog.text


def test_ranks_record_their_exit_codes_per_attempt(tmp_path: Path) -> None:
    writer = ControlWriter(tmp_path, replace(new_record(0, 30, 600), attempt=2)).open()
    try:
        supervision.report_exit(75, rank_env(tmp_path))
        supervision.report_exit(3, {CONTROL_DIR_VARIABLE: str(tmp_path), "RANK": "0"})
    finally:
        writer.close(0)
    assert read_exit_codes(tmp_path, 2) == {1: 75, 0: 3} and read_exit_codes(tmp_path, 1) == {}


# --- other nodes -----------------------------------------------------------------------------------


def write_peer(root: Path, node: int, record: ControlRecord) -> ControlRecord:
    directory = root / f"node{node}-{record.launch_id}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / supervision.CONTROL_FILE).write_bytes(record.to_json())
    return record


def test_a_node_counts_once_present_and_is_lost_when_silent_gone_or_ended(tmp_path: Path) -> None:
    watch = PeerWatch(tmp_path, node_rank=0, nnodes=2, own_directory=tmp_path / "node0-mine")
    peer = write_peer(tmp_path, 1, replace(new_record(1, 10, 600), host="node-b"))
    watch.poll(now=0.0)
    assert watch.losses(now=100.0, timeout_s=10) == []  # never seen beating: not present (yet)
    write_peer(tmp_path, 1, replace(peer, beat=1))
    watch.poll(now=1.0)
    assert watch.all_alive(now=2.0, recent_s=3) and watch.losses(now=2.0, timeout_s=10) == []
    [loss] = watch.losses(now=12.0, timeout_s=10)
    assert (loss.node, loss.ended) == (1, False) and loss.why == "no heartbeat from its launcher for over 10 s"
    line = loss.line(10)
    assert line.startswith("launch: node 1 (host node-b, pid ") and "rerun the same command on every node" in line
    write_peer(tmp_path, 1, replace(peer, beat=2, state=ENDED, exit_code=1))
    watch.poll(now=13.0)
    [loss] = watch.losses(now=13.0, timeout_s=10)
    assert loss.ended and loss.why == "its launcher has ended (exit 1)"


# --- progress and exit codes ------------------------------------------------------------------------


def test_progress_is_a_complete_checkpoint_whose_marker_this_attempt_wrote(tmp_path: Path) -> None:
    def complete(step: int) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir(exist_ok=True)
        (folder / "weights").write_bytes(b"x" * step)
        checkpoints.write_completion_marker(folder, {"global_step": step})

    complete(4)
    (tmp_path / "checkpoint-6").mkdir()  # no marker: not complete
    progress = Progress.before_attempt(tmp_path)
    assert progress.after_attempt() == (4, False)
    complete(8)
    assert progress.after_attempt() == (8, True)
    (tmp_path / "checkpoint-8" / COMPLETE_MARKER).write_text(json.dumps({"files": {"weights": {"size": 1}}}))
    assert progress.after_attempt() == (4, False)  # a marker the files do not match: not what resume takes


def test_the_ranks_codes_win_where_the_launchers_in_between_report_another() -> None:
    assert Launcher._status(1, {0: 75, 1: 75}) == 75  # torchrun exits 1 whatever its workers' codes
    assert Launcher._status(1, {0: 75, 1: 1}) == 1  # the ranks disagree: the job's own code
    assert Launcher._status(0, {0: 0, 1: 0}) == 0
    assert Launcher._status(247, {}) == 247  # a rank killed by a signal records nothing


def test_the_console_copies_the_job_as_it_comes_and_holds_it_until_released(tmp_path: Path) -> None:
    stream = io.BytesIO()
    console = Console(stream=stream)
    console.open_log(tmp_path / "launch.log")
    console.hold_job_output()
    console.pump([b"output in", b" two pieces\n"])
    console.say("doctor: ok")
    console.release_job_output()
    console.close()
    assert stream.getvalue() == b"doctor: ok\noutput in two pieces\n"
    assert (tmp_path / "launch.log").read_bytes() == stream.getvalue()
