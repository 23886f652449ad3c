"""Interruptions the way schedulers and people send them, through the launcher, never to the ranks alone.

``scancel``, ``timeout``, a Kubernetes eviction and Ctrl-C in a terminal signal the launcher's whole
process group; ``kill PID`` signals the launcher alone. Either way every rank must finish its step, save
a complete checkpoint at that step and stop; the launcher exits 75 with its console log intact to
the end and no rank left running; rerunning the same command finishes bit-identical (per-step
losses and every weight) to a run that was never interrupted (checked after SIGTERM to the group,
for pretraining and SFT: how the stop was requested does not change how its checkpoint resumes).
A second Ctrl-C aborts at once and leaves nothing a resume would trust.

The same holds across hosts: under ``HOSTFILE`` (DeepSpeed's pdsh runner over real ssh, to two loopback
hosts) the ranks are children of sshd, not of the launcher, and the stop reaches them through the
launcher's control file. A launcher SIGKILLed alone leaves no rank behind (they save and stop), and
rerunning resumes. Credentials in the launcher's environment (``HF_TOKEN``, ``SWANLAB_API_KEY``) are
not forwarded to the hosts, where they would be on the pdsh command line: the launcher names them, the
run goes on without them, and their values are on no command line and in no file, log or console
output. The reruns here compare with the same uninterrupted reference run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from llmtrain.errors import PREEMPTED_EXIT_CODE
from llmtrain.run.checkpoints import find_resume_checkpoint
from llmtrain.run.completeness import checkpoint_problem
from llmtrain.run.ledger import read_ledger
from llmtrain.tools.verify_resume import compare_runs

from ..conftest import (
    REPO_ROOT,
    complete_steps,
    free_port,
    launch,
    qa_conversations,
    save_random_tiny_model,
    wait,
    wait_for_checkpoint,
    write_jsonl,
)
from .conftest import REFERENCE_SAVE_STEPS, REFERENCE_STEPS, pretrain_reference_command

pytestmark = pytest.mark.slow

STEPS = REFERENCE_STEPS
SAVE_STEPS = REFERENCE_SAVE_STEPS
SIGNAL_AFTER_STEP = 4  # past checkpoint-3 and before checkpoint-6: the signal's own checkpoint is new
SFT_STEPS = 16  # SFT's steps are shorter: more of them leave the stop time to land before the end
SFT_SAVE_STEPS = 5
CREDENTIALS = {"HF_TOKEN": "hf_llmtrainTwoHostsSecret4b2e", "SWANLAB_API_KEY": "sk-llmtrain-two-hosts-secret-91c0"}


def pretrain_command(output_dir: Path) -> list[str]:
    """The command of the shared uninterrupted reference (tests/distributed/conftest.py)."""
    return pretrain_reference_command(output_dir)


def sft_command(output_dir: Path) -> list[str]:
    inputs = output_dir.parent.parent / "sft-inputs"
    if not inputs.exists():
        save_random_tiny_model(inputs / "base")
        write_jsonl(inputs / "chat.jsonl", qa_conversations(96))
    return [
        "bash", str(REPO_ROOT / "finetune.sh"), "--model_name_or_path", str(inputs / "base"),
        "--train_files", str(inputs / "chat.jsonl"), "--validation_split_percentage", "0", "--output_dir",
        str(output_dir), "--dataset_cache_dir", str(output_dir.parent / "cache"), "--max_seq_length", "128",
        "--per_device_train_batch_size", "2", "--disable_tqdm", "true", "--logging_steps", "1",
        "--eval_strategy", "no", "--save_steps", str(SFT_SAVE_STEPS), "--max_steps", str(SFT_STEPS),
        "--report_to", "none", "--checkpoint_checksums", "true",
    ]  # fmt: skip


COMMANDS = {"pretrain": pretrain_command, "sft": sft_command}


def start(stage: str, output_dir: Path, log_name: str) -> subprocess.Popen[bytes]:
    """The launcher as a scheduler starts it: the leader of a process group of its own."""
    return launch(COMMANDS[stage](output_dir), output_dir.parent, log_name, NPROC="2", MASTER_PORT=str(free_port()))


def trained_steps(output_dir: Path) -> int:
    ledger = output_dir / "data_ledger" / "rank-0.jsonl"
    return len(ledger.read_text().splitlines()) if ledger.is_file() else 0


def wait_for_step(process: subprocess.Popen[bytes], output_dir: Path, log: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while trained_steps(output_dir) < step:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def training_processes(output_dir: Path) -> list[psutil.Process]:
    """Any process still working for this run (ranks, DeepSpeed's launchers, the log copy)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(output_dir) in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, pretrain_reference: Path) -> dict[str, Path]:
    """One uninterrupted run per stage: pretraining's is shared with test_exact_resume.py; SFT's is built on
    first use."""
    root = tmp_path_factory.mktemp("interruptions")

    class References(dict):  # type: ignore[type-arg]
        def __missing__(self, stage: str) -> Path:
            output_dir = root / stage / "reference"
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            wait(start(stage, output_dir, "reference.log"), output_dir.parent, "reference.log", timeout=600)
            self[stage] = output_dir
            return output_dir

    return References({"pretrain": pretrain_reference})


@pytest.mark.parametrize(
    ("stage", "target", "sent"),
    [
        ("pretrain", "group", signal.SIGTERM),
        ("pretrain", "group", signal.SIGINT),
        ("pretrain", "bash", signal.SIGTERM),
        ("sft", "group", signal.SIGTERM),
    ],
    ids=[
        "pretrain-sigterm-to-group",
        "pretrain-ctrl-c-to-group",
        "pretrain-sigterm-to-bash-alone",
        "sft-sigterm-to-group",
    ],
)
def test_a_signal_through_the_launcher_saves_stops_with_75_and_resumes_bit_identical(
    references: dict[str, Path], stage: str, target: str, sent: signal.Signals
) -> None:
    reference = references[stage]
    output_dir = reference.parent / f"{target}-{sent.name}"
    console = output_dir.parent / f"{output_dir.name}.log"
    process = start(stage, output_dir, console.name)
    wait_for_step(process, output_dir, console, SIGNAL_AFTER_STEP)
    if target == "group":
        os.killpg(process.pid, sent)  # what scancel, timeout, a k8s eviction and Ctrl-C do
    else:
        os.kill(process.pid, sent)  # kill PID of the launcher alone
    assert process.wait(timeout=300) == PREEMPTED_EXIT_CODE, console.read_text()[-4000:]

    # A complete checkpoint at the interrupted step: the last step every rank trained.
    ledger = read_ledger(output_dir)
    last_step = max(ledger[0])
    assert max(ledger[1]) == last_step and SIGNAL_AFTER_STEP <= last_step < (
        STEPS if stage == "pretrain" else SFT_STEPS
    )
    assert complete_steps(output_dir)[-1] == last_step
    assert checkpoint_problem(output_dir / f"checkpoint-{last_step}", verify_checksums=True) is None
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "adapter_model.safetensors").exists()

    # The console log and the launcher's log copy both survived the signal and hold the end of the story.
    launch_log = next((output_dir / "logs").glob("launch-*.log")).read_text()
    for text in (console.read_text(), launch_log):
        assert f"stopped on SIGTERM after saving {output_dir}/checkpoint-{last_step}" in text  # from rank 0
        assert text.rstrip().splitlines()[-1].startswith(f"launch: stopped on SIG{sent.name.removeprefix('SIG')}")
        assert "(exit 75)" in text.rstrip().splitlines()[-1]
    assert training_processes(output_dir) == [], "a rank or launcher outlived the launcher"

    if sent != signal.SIGTERM or target != "group":
        return  # the rerun resumes from that checkpoint whatever stopped the run: shown for SIGTERM to the group
    rerun_log = f"{output_dir.name}-rerun.log"
    output = wait(start(stage, output_dir, rerun_log), output_dir.parent, rerun_log, timeout=600)
    assert f"resuming from {output_dir}/checkpoint-{last_step}" in output
    assert compare_runs(reference, output_dir) == []


def test_a_second_ctrl_c_aborts_at_once_and_leaves_nothing_a_resume_would_trust(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    console = tmp_path / "abort.log"
    process = start("pretrain", output_dir, console.name)
    wait_for_step(process, output_dir, console, SIGNAL_AFTER_STEP)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)  # the ranks are still finishing their step or saving
    os.killpg(process.pid, signal.SIGINT)
    returncode = process.wait(timeout=120)
    assert returncode not in (0, PREEMPTED_EXIT_CODE), console.read_text()[-3000:]
    assert "launch: second SIGINT: killing every rank now" in console.read_text()
    assert training_processes(output_dir) == []
    resume_from = find_resume_checkpoint(output_dir)
    if resume_from is not None:  # whatever resume would take is complete, byte for byte
        assert checkpoint_problem(resume_from, verify_checksums=True) is None
    for checkpoint in output_dir.glob("checkpoint-*"):
        if checkpoint_problem(checkpoint) is None:
            assert checkpoint_problem(checkpoint, verify_checksums=True) is None


def test_ranks_that_outlast_the_grace_period_are_killed(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    console = tmp_path / "grace.log"
    process = launch(
        pretrain_command(output_dir), tmp_path, console.name, NPROC="2", MASTER_PORT=str(free_port()),
        PREEMPT_GRACE_S="0",  # no time at all to save: the launcher kills the ranks right away
    )  # fmt: skip
    wait_for_step(process, output_dir, console, SIGNAL_AFTER_STEP)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, console.read_text()[-3000:]
    text = console.read_text()
    assert "launch: the ranks did not stop within PREEMPT_GRACE_S=0s; killing them" in text
    assert text.rstrip().splitlines()[-1].startswith("launch: stopped on SIGTERM; the ranks ended with exit")
    assert training_processes(output_dir) == []
    assert complete_steps(output_dir) == [SAVE_STEPS]  # nothing newer was trusted


def test_sigterm_to_the_launchers_group_stops_the_ranks_on_two_ssh_hosts_and_the_rerun_is_bit_identical(
    references: dict[str, Path], loopback_ssh: Path
) -> None:
    reference = references["pretrain"]
    output_dir = reference.parent / "two-hosts"
    hostfile = reference.parent / "hostfile"
    hostfile.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    env = {
        "HOSTFILE": str(hostfile), "NPROC": "1", "MASTER_ADDR": "127.0.0.2",
        "PATH": f"{loopback_ssh / 'bin'}{os.pathsep}{os.environ['PATH']}",
        # The threads each of the reference's 2 local CPU ranks had: the same sums, bit for bit.
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2)),
        "XDG_CACHE_HOME": str(reference.parent / "xdg-cache"),
        **CREDENTIALS,
    }  # fmt: skip
    console = reference.parent / "two-hosts.log"
    process = launch(pretrain_command(output_dir), reference.parent, console.name, MASTER_PORT=str(free_port()), **env)
    wait_for_checkpoint(process, output_dir / f"checkpoint-{SAVE_STEPS}", console)  # the first periodic one
    reached = trained_steps(output_dir)
    command_lines = " ".join(" ".join(found.info["cmdline"] or []) for found in psutil.process_iter(["cmdline"]))
    assert "pdsh" in command_lines and not [secret for secret in CREDENTIALS.values() if secret in command_lines]
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)  # what scancel, timeout and a Kubernetes stop send
    assert process.wait(timeout=60) == PREEMPTED_EXIT_CODE, console.read_text()[-4000:]
    assert time.monotonic() - signalled < 60

    # Both hosts' ranks trained to the same step, at or after the one reached at the signal, and saved it.
    ledger = read_ledger(output_dir)
    last_step = max(ledger[0])
    assert max(ledger[1]) == last_step and reached <= last_step < STEPS, (reached, last_step)
    checkpoint = output_dir / f"checkpoint-{last_step}"
    assert complete_steps(output_dir)[-1] == last_step
    assert checkpoint_problem(checkpoint, verify_checksums=True) is None
    names = " ".join(path.name for path in checkpoint.glob("global_step*/*optim_states.pt"))
    shards = sorted(re.findall(r"zero_pp_rank_(\d+)_", names))
    assert shards == ["0", "1"]  # each host's rank wrote its optimizer shard
    last_line = console.read_text().rstrip().splitlines()[-1]
    assert last_line.startswith("launch: stopped on SIGTERM after saving a complete checkpoint") and (
        f"(step {last_step}) (exit 75)" in last_line
    ), last_line
    assert training_processes(output_dir) == [], "a rank, launch.py, pdsh or ssh outlived the launcher"

    rerun_log = "two-hosts-rerun.log"
    rerun = launch(pretrain_command(output_dir), reference.parent, rerun_log, MASTER_PORT=str(free_port()), **env)
    output = wait(rerun, reference.parent, rerun_log, timeout=600)
    assert f"resuming from {checkpoint}" in output
    assert compare_runs(reference, output_dir) == []
    assert "launch: credentials not passed to the remote ranks: HF_TOKEN SWANLAB_API_KEY (" in output
    for path in reference.parent.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [secret for secret in CREDENTIALS.values() if secret.encode() in content], f"a secret in {path}"


def test_a_launcher_killed_alone_leaves_no_rank_behind_and_the_rerun_resumes(references: dict[str, Path]) -> None:
    reference = references["pretrain"]
    output_dir = reference.parent / "launcher-sigkill"
    console = output_dir.parent / f"{output_dir.name}.log"
    process = start("pretrain", output_dir, console.name)
    wait_for_step(process, output_dir, console, SIGNAL_AFTER_STEP)
    os.kill(process.pid, signal.SIGKILL)  # nothing of the launcher runs after this: no handler, no cleanup
    process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while training_processes(output_dir):
        assert time.monotonic() < deadline, "ranks outlived their launcher by a minute"
        time.sleep(0.5)

    # On their way out the ranks saved the step they had reached (the launcher was gone: nobody else would).
    ledger = read_ledger(output_dir)
    last_step = max(ledger[0])
    assert max(ledger[1]) == last_step and complete_steps(output_dir)[-1] == last_step
    rerun_log = f"{output_dir.name}-rerun.log"
    output = wait(start("pretrain", output_dir, rerun_log), output_dir.parent, rerun_log, timeout=600)
    assert f"resuming from {output_dir}/checkpoint-{last_step}" in output
    assert compare_runs(reference, output_dir) == []
