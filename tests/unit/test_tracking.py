"""SwanLab mode choice (a stored ``swanlab login`` counts, its key is never logged) and the resume helpers."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState

from llmtrain.config.arguments import ModelArguments, PretrainDataArguments, TrainArguments
from llmtrain.config.parser import parse_args
from llmtrain.run.tracking import (
    SwanLabResume,
    choose_swanlab_mode,
    drop_dashboard_entries,
    swanlab_callbacks,
)

API_KEY = "swlTestStoredLoginKey7c2e9b41d0"


@pytest.fixture
def swanlab_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key in the environment, an empty home, swanlab's config dir ($SWANLAB_ROOT) and cwd under tmp_path."""
    for name in ("SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_SAVE_DIR", "SWANLAB_API_HOST", "SWANLAB_WEB_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-root"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def store_login(directory: Path) -> None:
    """What ``swanlab login`` leaves behind, written by swanlab's own credential writer."""
    from swanlab import Settings
    from swanlab.sdk.internal.pkg import nrc

    defaults = Settings()
    nrc.write(directory / ".netrc", api_host=defaults.api_host, web_host=defaults.web_host, api_key=API_KEY)


def test_without_a_key_or_a_login_the_mode_is_local(swanlab_home: Path) -> None:
    assert choose_swanlab_mode(None) == ("local", "no SwanLab API key or login")


@pytest.mark.parametrize("where", ["user", "project"])
def test_a_stored_login_chooses_cloud_and_its_key_is_never_logged(
    swanlab_home: Path, where: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    # `swanlab login` stores in $SWANLAB_ROOT (default ~/.swanlab); `--save local` in ./.swanlab
    store_login(swanlab_home / ("swanlab-root" if where == "user" else ".swanlab"))
    caplog.set_level(logging.DEBUG)
    assert choose_swanlab_mode(None) == ("cloud", "API key from a stored swanlab login")
    _, _, train = parse_args(
        (ModelArguments, PretrainDataArguments, TrainArguments),
        ["--report_to", "swanlab", "--output_dir", str(swanlab_home / "out")],
    )
    resume, callback = swanlab_callbacks(train, {"learning_rate": 1.0}, "runid0123456789abcdefg")
    assert isinstance(resume, SwanLabResume) and resume.mode == "cloud"
    init_kwargs = resume.init_kwargs  # what SwanLabResume hands to swanlab.init
    assert resume.callback is callback
    assert init_kwargs["mode"] == "cloud" and init_kwargs["resume"] == "allow"
    assert init_kwargs["id"] == "runid0123456789abcdefg"
    assert "mode cloud (API key from a stored swanlab login)" in caplog.text
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert API_KEY not in text


def test_the_environment_key_and_explicit_modes_come_first(swanlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_login(swanlab_home / "swanlab-root")
    assert choose_swanlab_mode("offline")[0] == "offline"
    monkeypatch.setenv("SWANLAB_MODE", "local")
    assert choose_swanlab_mode(None) == ("local", "from SWANLAB_MODE")
    monkeypatch.delenv("SWANLAB_MODE")
    monkeypatch.setenv("SWANLAB_API_KEY", "from-the-environment")
    assert choose_swanlab_mode(None) == ("cloud", "API key from SWANLAB_API_KEY")


def test_a_login_stored_for_another_host_is_not_used(swanlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_login(swanlab_home / "swanlab-root")
    monkeypatch.setenv("SWANLAB_API_HOST", "https://swanlab.internal.example")  # swanlab's own rule
    assert choose_swanlab_mode(None)[0] == "local"


def test_the_swanlab_run_opens_once_under_the_run_id_with_the_trainers_config(swanlab_home: Path) -> None:
    import swanlab

    _, _, train = parse_args(
        (ModelArguments, PretrainDataArguments, TrainArguments),
        ["--report_to", "swanlab", "--swanlab_mode", "offline", "--output_dir", str(swanlab_home / "out")],
    )
    resume, callback = swanlab_callbacks(train, {"learning_rate": 1.0}, "runid0123456789abcdefg")
    try:
        resume.on_train_begin(train, TrainerState(), TrainerControl())
        callback.on_train_begin(train, TrainerState(), TrainerControl())  # SwanLab's own: finds it all done
        run = swanlab.get_run()
        assert run.id == "runid0123456789abcdefg"
        assert run.config["llmtrain"] == {"learning_rate": 1.0} and run.config["FRAMEWORK"] == "transformers"
    finally:
        swanlab.finish()
    run_dirs = [path.name for path in Path(str(train.swanlab_log_dir)).iterdir() if path.name.startswith("run-")]
    assert len(run_dirs) == 1 and run_dirs[0].endswith("-runid0123456789abcdefg"), run_dirs


class RecordingCallback:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, Any]]] = []

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any]) -> None:
        self.logged.append((state.global_step, logs))


def test_replay_logs_the_checkpoint_history_up_to_the_resume_step_each_at_its_step(tmp_path: Path) -> None:
    state = TrainerState(global_step=4)
    state.log_history = [
        {"loss": 8.0, "tokens_per_second": 10.0, "step": 2},
        {"eval_loss": 7.5, "step": 2},
        {"loss": 7.0, "step": 4},
        {"loss": 6.0, "step": 6},  # logged after the checkpoint: trained and logged again
    ]
    before = copy.deepcopy(state.log_history)
    recorder = RecordingCallback()
    resume = SwanLabResume(recorder, run_id="r", mode="local", log_dir=tmp_path, init_kwargs={})
    assert resume.replay(None, state, TrainerControl()) == 2  # type: ignore[arg-type]
    assert recorder.logged == [
        (2, {"loss": 8.0, "tokens_per_second": 10.0}),
        (2, {"eval_loss": 7.5}),
        (4, {"loss": 7.0}),
    ]
    assert state.global_step == 4 and state.log_history == before


def test_interrupted_attempts_are_this_run_ids_directories_only(tmp_path: Path) -> None:
    for name in ["run-20260101_000000-myrun", "run-20260102_000000-myrun", "run-20260101_000000-other", "files"]:
        (tmp_path / name).mkdir()
    (tmp_path / "run-20260101_000000-myrun-host-12").mkdir()  # swanlab's parallel naming: found by its run file
    (tmp_path / "run-20260101_000000-myrun-host-12" / "run-myrun.swanlab").touch()
    resume = SwanLabResume(None, run_id="myrun", mode="local", log_dir=tmp_path, init_kwargs={})
    assert [path.name for path in resume.interrupted_attempts()] == [
        "run-20260101_000000-myrun",
        "run-20260101_000000-myrun-host-12",
        "run-20260102_000000-myrun",
    ]
    absent = SwanLabResume(None, run_id="x", mode="local", log_dir=tmp_path / "absent", init_kwargs={})
    assert absent.interrupted_attempts() == []


def test_dropping_dashboard_entries_frees_the_name_and_keeps_other_runs(tmp_path: Path) -> None:
    from swanboard.db import connect
    from swanboard.db.models import Experiment, Project, Tag

    connect(autocreate=True, path=str(tmp_path))
    Project.init("llmtrain")
    killed = Experiment.create(name="out", run_id="run-1-myrun", colors=("#000", "#000"))
    Tag.create(experiment_id=killed.id, name="train/loss", type="line", folder="1")
    Experiment.create(name="other", run_id="run-1-other", colors=("#000", "#000"))

    drop_dashboard_entries(tmp_path, ["run-1-myrun"])

    connect(path=str(tmp_path))
    assert [(entry.name, entry.run_id) for entry in Experiment.select()] == [("other", "run-1-other")]
    assert Tag.select().count() == 0
    Experiment.create(name="out", run_id="run-2-myrun", colors=("#000", "#000"))  # the name is free again
    drop_dashboard_entries(tmp_path / "no-dashboard-here", ["run-2-myrun"])  # no database: nothing to do
