"""Check that an interrupted and resumed run equals an uninterrupted one, on your own config.

    python -m llmtrain.tools.verify_resume pretrain [configs/X.yaml] [--key value ...] \\
        --steps 8 --kill_after 5 --workdir /tmp/verify
    python -m llmtrain.tools.verify_resume sft configs/sft_tiny_full.yaml --steps 6 --kill_after 4

Runs the stage's launcher (``pretrain.sh`` / ``finetune.sh``, so the same ranks, DeepSpeed
config and GPUs as a real launch; ``NPROC=2`` for two CPU ranks) twice from scratch, each for
``--steps`` optimizer steps with a checkpoint every ``--save_every`` steps:

1. ``reference``: uninterrupted (or ``--reference DIR``, a finished run of the same config and
   steps, reused);
2. ``resumed``: every rank is SIGKILLed right after step ``--kill_after`` (see
   :mod:`llmtrain.run.faults`, ``--fault`` picks another point), and the launcher's automatic
   restart resumes it from the last complete checkpoint.

Then it compares the two: per-step training losses and every tensor of the final weights
(bit for bit unless ``--atol`` is given) and the data-order ledger (the same batches at every
step on every rank: none skipped, none repeated).

With ``--resume_nproc N`` the interrupted run is not restarted by its launcher but resumed on
``N`` ranks, with the gradient accumulation scaled so the global batch stays the same (2 ranks x
accumulation 2 -> 1 rank x accumulation 4); then the training-set samples of every step are
compared (:func:`llmtrain.run.ledger.samples_per_step`: the same, step for step), and the
losses' largest difference is reported (summation order differs across rank counts, so bits do
not). Exit 0 when they match, 1 with the differences listed when not.

Training runs in fp32 by default (``--bf16 false``): bf16 CPU kernels and some GPU kernels are
not bitwise reproducible, which would hide a real difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmtrain.cli import run_cli
from llmtrain.errors import ConfigError
from llmtrain.run.faults import FAULT_ENV, FAULT_POINTS
from llmtrain.run.ledger import ledger_differences, read_ledger, samples_per_step
from llmtrain.run.output_dir import SUMMARY_FILE
from llmtrain.stages import STAGES, find_stage

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def step_losses(output_dir: Path) -> dict[int, float]:
    """``{step: training loss}`` from a finished run's ``trainer_state.json``."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {int(entry["step"]): float(entry["loss"]) for entry in history if "loss" in entry}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final model (or adapter) saved in ``output_dir``."""
    tensors: dict[str, torch.Tensor] = {}
    for name in WEIGHT_FILES:
        if (output_dir / name).is_file():
            tensors.update({f"{name}:{key}": value for key, value in load_file(output_dir / name).items()})
    for shard in sorted(output_dir.glob("model-*-of-*.safetensors")):
        tensors.update({f"{shard.name}:{key}": value for key, value in load_file(shard).items()})
    return tensors


def compare_runs(reference: Path, resumed: Path, atol: float = 0.0) -> list[str]:
    """Differences between two finished runs: losses, final weights, data order (empty: identical)."""
    problems = []
    want_losses, got_losses = step_losses(reference), step_losses(resumed)
    if want_losses.keys() != got_losses.keys():
        problems.append(f"logged steps differ: {sorted(want_losses)} vs {sorted(got_losses)}")
    for step in sorted(want_losses.keys() & got_losses.keys()):
        if abs(want_losses[step] - got_losses[step]) > atol:
            problems.append(f"loss at step {step}: {want_losses[step]!r} vs {got_losses[step]!r}")
    want_weights, got_weights = final_weights(reference), final_weights(resumed)
    if not want_weights:
        problems.append(f"no final weights in {reference}")
    if want_weights.keys() != got_weights.keys():
        problems.append("the final weight files hold different tensors")
    for name in sorted(want_weights.keys() & got_weights.keys()):
        difference = (want_weights[name].double() - got_weights[name].double()).abs().max().item()
        if difference > atol or (atol == 0.0 and not torch.equal(want_weights[name], got_weights[name])):
            problems.append(f"weight {name}: max abs difference {difference:.3g}")
    problems += ledger_differences(read_ledger(reference), read_ledger(resumed))
    return problems


def sample_differences(reference: Path, resumed: Path) -> list[str]:
    """Steps whose training-set samples differ between two runs (all ranks together; empty: the same).

    >>> import tempfile
    >>> sample_differences(Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp()))
    []
    """
    want, got = samples_per_step(reference), samples_per_step(resumed)
    return [
        f"step {step}: samples {want.get(step)} vs {got.get(step)}"
        for step in sorted(want.keys() | got.keys())
        if want.get(step) != got.get(step)
    ]


def launch(
    stage: str,
    user_args: list[str],
    output_dir: Path,
    fault: str | None,
    run_args: list[str],
    restarts: int = 1,
    nproc: int | None = None,
    log_name: str | None = None,
) -> None:
    """One launch through the stage's launcher; its log goes to ``output_dir.log`` (or ``log_name``).

    With ``fault`` and ``restarts`` 0 the launch is expected to end killed, with a checkpoint left.
    """
    env = {key: value for key, value in os.environ.items() if key != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
        env["MAX_RESTARTS"] = str(restarts)
    if nproc is not None:
        env["NPROC"] = str(nproc)
    command = ["bash", str(find_stage(stage).launcher_path), *user_args, "--output_dir", str(output_dir), *run_args]
    log_path = output_dir.parent / log_name if log_name else output_dir.with_suffix(".log")
    logger.info("%s run: %s (log %s)", "interrupted" if fault else "reference", " ".join(command), log_path)
    with log_path.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if fault and restarts == 0:
        if status == 0:
            raise ConfigError(f"the interrupted run was not interrupted (exit 0); see {log_path}")
        return
    if status != 0 or not (output_dir / SUMMARY_FILE).is_file():
        raise ConfigError(f"the {'interrupted' if fault else 'reference'} run failed (exit {status}); see {log_path}")


def elastic_accumulation(reference: Path, nproc: int) -> int:
    """The gradient accumulation that keeps ``reference``'s global batch on ``nproc`` ranks."""
    summary = json.loads((reference / SUMMARY_FILE).read_text())
    config = json.loads((reference / "run_manifest.json").read_text())["config"]
    world, accumulation = int(summary["world_size"]), int(config["gradient_accumulation_steps"])
    if (world * accumulation) % nproc:
        raise ConfigError(
            f"--resume_nproc {nproc}: the reference's {world} ranks x accumulation {accumulation} cannot be split "
            f"evenly over {nproc} ranks"
        )
    return world * accumulation // nproc


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each run")
    parser.add_argument("--kill_after", type=int, default=5, help="the step at which every rank is killed")
    parser.add_argument("--save_every", type=int, default=2, help="checkpoint interval (steps)")
    parser.add_argument("--fault", choices=FAULT_POINTS[:3], default="kill_after_step")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/verify_resume"))
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance; 0 means bitwise equal")
    parser.add_argument(
        "--resume_nproc", type=int, help="resume on this many ranks (same global batch) and compare samples per step"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="a finished uninterrupted run of the same config and steps: compare with it instead of running one",
    )
    options, user_args = parser.parse_known_args(argv)
    if not options.save_every <= options.kill_after <= options.steps:
        raise ConfigError("need --save_every <= --kill_after <= --steps (a checkpoint must exist before the kill)")
    workdir = options.workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"--workdir {workdir} is not empty; give a new or empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    run_args = [
        "--max_steps", str(options.steps), "--save_steps", str(options.save_every), "--logging_steps", "1",
        "--eval_strategy", "no", "--report_to", "none", "--bf16", "false", "--disable_tqdm", "true",
        "--dataset_cache_dir", str(workdir / "dataset_cache"),
    ]  # fmt: skip
    reference = options.reference.resolve() if options.reference else workdir / "reference"
    if options.reference is None:
        launch(options.stage, user_args, reference, None, run_args)
    elif not (reference / SUMMARY_FILE).is_file():
        raise ConfigError(f"--reference {options.reference}: no {SUMMARY_FILE}, so not a finished run")
    fault = f"{options.fault}={options.kill_after}"
    if options.resume_nproc:
        resumed = workdir / "resumed"
        launch(options.stage, user_args, resumed, fault, run_args, restarts=0, log_name="interrupted.log")
        accumulation = elastic_accumulation(reference, options.resume_nproc)
        launch(options.stage, user_args, resumed, None, [*run_args, "--gradient_accumulation_steps", str(accumulation)],
               nproc=options.resume_nproc)  # fmt: skip
        problems = sample_differences(reference, resumed)
        losses = step_losses(reference), step_losses(resumed)
        largest = max((abs(losses[0][s] - losses[1][s]) for s in losses[0].keys() & losses[1].keys()), default=0.0)
        if problems:
            for problem in problems:
                logger.error("verify_resume: %s", problem)
            raise SystemExit(1)
        logger.info(
            "verify_resume: the same samples at every one of %d steps on %d rank(s) (accumulation %d); largest loss "
            "difference %.3g",
            len(samples_per_step(resumed)), options.resume_nproc, accumulation, largest,
        )  # fmt: skip
        return
    launch(options.stage, user_args, workdir / "resumed", fault, run_args)
    problems = compare_runs(reference, workdir / "resumed", options.atol)
    if problems:
        for problem in problems:
            logger.error("verify_resume: %s", problem)
        raise SystemExit(1)
    logger.info(
        "verify_resume: identical: %d step losses, %d weight tensors and the data order of every rank match",
        len(step_losses(reference)),
        len(final_weights(reference)),
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
