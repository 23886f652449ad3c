"""Experiment tracking with SwanLab, and a loss-curve PNG for headless nodes.

transformers' built-in ``report_to="swanlab"`` integration crashes with swanlab >= 0.8
(``swanlab.get_run()`` now raises instead of returning None), so ``report_to: swanlab`` is
routed here to swanlab's own callback, which initialises the run on the world's rank 0 only.
With no API key the run is written locally (view it with ``swanlab watch <log_dir>``) and no
network connection is attempted.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain.config.arguments import TrainArguments

logger = logging.getLogger(__name__)

# Above this the exponent overflows a float; such a model is untrained noise anyway.
MAX_LOSS_FOR_PERPLEXITY = 50.0


def resolve_swanlab_mode(requested: str | None) -> str:
    """The SwanLab mode to run in: as requested, else ``$SWANLAB_MODE``, else cloud with a key, else local.

    >>> resolve_swanlab_mode("offline")
    'offline'
    """
    if requested:
        return requested
    if os.environ.get("SWANLAB_MODE"):
        return os.environ["SWANLAB_MODE"]
    return "cloud" if os.environ.get("SWANLAB_API_KEY") else "local"


def swanlab_callbacks(args: TrainArguments, run_config: dict[str, Any], run_id: str) -> list[TrainerCallback]:
    """SwanLab's own Trainer callback when ``report_to`` named swanlab, else nothing.

    The SwanLab run is opened with ``id=run_id, resume="allow"``: a resumed training run (same
    id, kept in its checkpoint's manifest) continues the same experiment instead of a new one.
    """
    if not args.use_swanlab:
        return []
    from swanlab.integration.transformers import SwanLabCallback

    mode = resolve_swanlab_mode(args.swanlab_mode)
    experiment_name = args.swanlab_experiment_name or Path(str(args.output_dir)).name
    if args.should_log:
        logger.info(
            "SwanLab: project %s, experiment %s, run id %s, mode %s, files in %s",
            args.swanlab_project,
            experiment_name,
            run_id,
            mode,
            args.swanlab_log_dir,
        )
    callback = SwanLabCallback(
        project=args.swanlab_project,
        experiment_name=experiment_name,
        log_dir=args.swanlab_log_dir,
        mode=mode,
    )
    # The callback's constructor has no id/resume parameters but hands these kwargs to swanlab.init.
    init_kwargs = getattr(callback, "_init_kwargs", None)
    if not isinstance(init_kwargs, dict):
        raise RuntimeError("this swanlab version's SwanLabCallback has no _init_kwargs; use the pinned swanlab")
    init_kwargs.update(id=run_id, resume="allow")
    callback.update_config({"llmtrain": run_config})
    return [callback]


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
