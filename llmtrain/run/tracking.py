"""Experiment tracking with SwanLab, and a loss-curve PNG for headless nodes.

transformers' built-in ``report_to="swanlab"`` integration crashes with swanlab >= 0.8
(``swanlab.get_run()`` now raises instead of returning None), so ``report_to: swanlab`` is
routed here to swanlab's own callback, which initialises the run on the world's rank 0 only.
With no API key (``SWANLAB_API_KEY`` or a stored ``swanlab login``) the run is written locally
(view it with ``swanlab watch <log_dir>``) and no network connection is attempted.

One training run is one SwanLab experiment across restarts, under the run id kept in every
checkpoint's manifest. In cloud mode swanlab itself continues the experiment of that id (the
server resumes it). In local and offline mode swanlab 0.10.3 ignores ``resume``: every
``swanlab.init`` makes a new run directory (``run-<time>-<id>``) and, in local mode, a new
dashboard entry (``<name>-2``), and a killed attempt stays "running" forever (no finish record
in its ``.swanlab`` file, status 0 in the dashboard's ``runs.swanlab``). So on a resume,
:class:`SwanLabResume` removes the interrupted attempts of this run id (their dashboard entries
before ``swanlab.init`` frees the name, their directories after it) and replays the resumed
checkpoint's ``log_history`` into the new experiment: one experiment, with every step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain.config.arguments import TrainArguments
from llmtrain.errors import ConfigError

logger = logging.getLogger(__name__)

# Above this the exponent overflows a float; such a model is untrained noise anyway.
MAX_LOSS_FOR_PERPLEXITY = 50.0
# The modes in which swanlab does not resume an experiment itself (see the module docstring).
LOCAL_MODES = ("local", "offline")
# The modes in which swanlab.init logs in to a server (swanlab takes "online" for "cloud").
CLOUD_MODES = ("cloud", "online")
# The local dashboard's database, in the log dir (swanboard's name for it).
DASHBOARD_DB = "runs.swanlab"


def choose_swanlab_mode(requested: str | None) -> tuple[str, str]:
    """``(mode, why)``: as requested, else ``$SWANLAB_MODE``, else cloud where swanlab finds an API key, else local.

    ``why`` names where the choice came from (for the log); it never holds a key.

    >>> choose_swanlab_mode("offline")
    ('offline', 'from swanlab_mode')
    """
    if requested:
        return requested, "from swanlab_mode"
    if os.environ.get("SWANLAB_MODE"):
        return os.environ["SWANLAB_MODE"], "from SWANLAB_MODE"
    source = swanlab_key_source()
    return ("cloud", f"API key from {source}") if source else ("local", "no SwanLab API key or login")


def cloud_unreachable_message(error: BaseException) -> str:
    """The one error for a cloud-mode ``swanlab.init`` that failed (no network, a wrong key, a server down).

    Only the error's type is quoted, and the message of swanlab's own login and API errors (which
    hold no key); a settings error can quote the values it was given, a key among them.
    """
    from swanlab import Settings
    from swanlab.exceptions import ApiError, AuthenticationError

    try:
        host = Settings().api_host
    except Exception:  # a malformed setting: then the host is not the point
        host = "the SwanLab server"
    detail = f": {str(error)[:200]}" if isinstance(error, AuthenticationError | ApiError) else ""
    return (
        f"swanlab_mode: cloud mode could not log in to {host} ({type(error).__name__}{detail}). "
        "On a node without internet access set swanlab_mode: local (or offline, and `swanlab sync` the run "
        "later), or report_to: none; otherwise check the API key"
    )


def swanlab_key_source() -> str | None:
    """Where swanlab would take its API key from (never the key itself), or None where it has none.

    ``SWANLAB_API_KEY``, else what ``swanlab login`` stored (a ``.netrc`` in ``./.swanlab/`` or in
    ``$SWANLAB_ROOT``, by default ``~/.swanlab/``), found by swanlab's own ``Settings``.
    """
    if os.environ.get("SWANLAB_API_KEY"):
        return "SWANLAB_API_KEY"
    try:
        from swanlab import Settings

        has_key = bool(Settings().api_key)
    except Exception as error:  # a malformed SWANLAB_* setting; swanlab.init reports it in its own words
        # Only the type: a settings error can quote the values it was given, a key among them.
        logger.warning("could not read swanlab's settings (%s); not looking for a stored login", type(error).__name__)
        return None
    return "a stored swanlab login" if has_key else None


def swanlab_callbacks(args: TrainArguments, run_config: dict[str, Any], run_id: str) -> list[TrainerCallback]:
    """SwanLab's own Trainer callback (after :class:`SwanLabResume`) when ``report_to`` named swanlab, else nothing.

    The SwanLab run is opened with ``id=run_id, resume="allow"``: a resumed training run (same
    id, kept in its checkpoint's manifest) continues the same experiment instead of a new one.
    """
    if not args.use_swanlab:
        return []
    from swanlab.integration.transformers import SwanLabCallback

    mode, why = choose_swanlab_mode(args.swanlab_mode)
    experiment_name = args.swanlab_experiment_name or Path(str(args.output_dir)).name
    if args.should_log:
        logger.info(
            "SwanLab: project %s, experiment %s, run id %s, mode %s (%s), files in %s",
            args.swanlab_project,
            experiment_name,
            run_id,
            mode,
            why,
            args.swanlab_log_dir,
        )
    settings = {
        "project": args.swanlab_project,
        "experiment_name": experiment_name,
        "log_dir": args.swanlab_log_dir,
        "mode": mode,
    }
    callback = SwanLabCallback(**settings)
    callback.update_config({"llmtrain": run_config})
    # The callback's constructor takes no id or resume mode: SwanLabResume opens the run with them itself.
    init_kwargs = {**settings, "id": run_id, "resume": "allow"}
    log_dir = Path(str(args.swanlab_log_dir))
    return [SwanLabResume(callback, run_id=run_id, mode=mode, log_dir=log_dir, init_kwargs=init_kwargs), callback]


class SwanLabResume(TrainerCallback):
    """One SwanLab experiment per training run across restarts, on the world's rank 0 (module docstring).

    It comes just before SwanLab's callback and opens the SwanLab run itself at train begin, so
    that it can act before ``swanlab.init`` and after it: ``swanlab.init(**init_kwargs)`` with this
    run's id and ``resume="allow"`` (SwanLab's callback takes neither), then ``callback.setup``,
    which finds the run open and only records the Trainer's config; SwanLab's own
    ``on_train_begin`` then finds it all done.
    """

    def __init__(self, callback: Any, *, run_id: str, mode: str, log_dir: Path, init_kwargs: dict[str, Any]) -> None:
        self.callback = callback
        self.run_id = run_id
        self.mode = mode
        self.log_dir = log_dir
        self.init_kwargs = init_kwargs

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        import swanlab

        if not state.is_world_process_zero or swanlab.has_run():
            return  # the other ranks log nothing; a run someone else opened is theirs to manage
        interrupted = self.interrupted_attempts() if self.mode in LOCAL_MODES else []
        if interrupted:  # local mode's dashboard (or an earlier local-mode attempt's, when rerun offline)
            try:  # before swanlab.init, which would otherwise name the new entry "<name>-2"
                drop_dashboard_entries(self.log_dir, [path.name for path in interrupted])
            except Exception as error:  # a tracker must not stop training: then the dashboard lists two entries
                logger.warning("SwanLab: could not remove the interrupted attempts' dashboard entries: %r", error)
        try:
            swanlab.init(callbacks=[self.callback], **self.init_kwargs)
            self.callback.setup(args, state, model)
        except Exception as error:
            if self.mode not in CLOUD_MODES:
                raise
            raise ConfigError(cloud_unreachable_message(error)) from error
        replayed = self.replay(args, state, control) if state.global_step > 0 and self.mode != "disabled" else 0
        for path in interrupted:
            shutil.rmtree(path, ignore_errors=True)
        if state.global_step > 0 or interrupted:
            logger.info(
                "SwanLab: run %s continues at step %d (%s mode): %d logged steps replayed from the checkpoint, "
                "%d interrupted attempt(s) replaced%s",
                self.run_id,
                state.global_step,
                self.mode,
                replayed,
                len(interrupted),
                f" ({', '.join(path.name for path in interrupted)})" if interrupted else "",
            )

    def interrupted_attempts(self) -> list[Path]:
        """This run id's earlier run directories in the log dir (swanlab names them ``run-<time>-<id>``)."""
        if not self.log_dir.is_dir():
            return []
        return sorted(
            path
            for path in self.log_dir.iterdir()
            if path.is_dir()
            and path.name.startswith("run-")
            and (path.name.endswith(f"-{self.run_id}") or (path / f"run-{self.run_id}.swanlab").is_file())
        )

    def replay(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> int:
        """Log the resumed checkpoint's ``log_history`` through SwanLab's callback, each entry at its step.

        The checkpoint's history is what the interrupted attempt logged up to the step training
        resumes at (the throughput keys included); steps after it are trained and logged again.
        Where swanlab already holds a step (cloud, resumed on the server) it skips it.
        """
        shadow = copy.copy(state)
        steps: set[int] = set()
        for entry in state.log_history:
            step = entry.get("step")
            if not isinstance(step, int) or step > state.global_step:
                continue
            shadow.global_step = step
            self.callback.on_log(
                args, shadow, control, logs={key: value for key, value in entry.items() if key != "step"}
            )
            steps.add(step)
        return len(steps)


def drop_dashboard_entries(log_dir: Path, run_dir_names: list[str]) -> None:
    """Delete the local dashboard's entries for these run directories, as its own "delete experiment" does.

    The entry (``runs.swanlab``, swanboard's database) and its tags and charts go; so do the
    project-wide charts left with no source. The directories themselves are left to the caller.
    """
    if not (log_dir / DASHBOARD_DB).is_file():
        return
    from swanboard.db import connect
    from swanboard.db.models import Chart, Experiment, Tag

    database = connect(path=str(log_dir))
    try:
        with database.atomic():
            for experiment in list(Experiment.select().where(Experiment.run_id.in_(run_dir_names))):
                tag_names = [tag.name for tag in Tag.select().where(Tag.experiment_id == experiment.id)]
                project_id = experiment.project_id_id
                Experiment.delete().where(Experiment.id == experiment.id).execute()  # cascades to tags, charts
                orphans = [
                    chart.id
                    for chart in Chart.select().where(Chart.project_id == project_id, Chart.name.in_(tag_names))
                    if chart.sources.count() == 0
                ]
                Chart.delete().where(Chart.id.in_(orphans)).execute()
    finally:
        database.close()


class PerplexityCallback(TrainerCallback):
    """Adds ``eval_perplexity = exp(eval_loss)`` to eval logs, before the console and trackers see them."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "eval_loss" in logs:
            perplexity = math.exp(min(logs["eval_loss"], MAX_LOSS_FOR_PERPLEXITY))
            logs["eval_perplexity"] = perplexity
            if state.log_history and "eval_loss" in state.log_history[-1]:
                state.log_history[-1]["eval_perplexity"] = perplexity


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> None:
    """Write train (and eval) loss against step as a PNG, for nodes with no dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
