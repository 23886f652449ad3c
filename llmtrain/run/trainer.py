"""The Trainer this project runs: the HF Trainer plus the ledger, the step guard, faults, and its callbacks."""

from __future__ import annotations

import atexit
import logging
import math
import re
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from llmtrain.compat import remove_unused_columns, shutdown_loader_workers, trainer_skips_no_batches
from llmtrain.config.arguments import TrainArguments
from llmtrain.data.order import GlobalOrderBatchSampler
from llmtrain.errors import ConfigError
from llmtrain.loss import enable_memory_efficient_loss, liger_kernels_problem
from llmtrain.metrics import PADDED_POSITIONS, ThroughputCallback, TokenCounter
from llmtrain.paths import apply_umask
from llmtrain.run.checkpoints import CompleteCheckpointCallback, reporting_full_disk
from llmtrain.run.faults import FaultInjector
from llmtrain.run.guards import StepGuardCallback
from llmtrain.run.ledger import DataLedger
from llmtrain.run.tracking import PerplexityCallback, swanlab_callbacks

logger = logging.getLogger(__name__)

LOADER_STATE_DIR = "dataloader"  # in a checkpoint: rank-R.pt, each rank's StatefulDataLoader state
SAMPLE_INDEX = "sample_index"  # one sample's position in the training set, for the ledger
SAMPLE_INDICES = "sample_indices"  # a micro-batch's, popped before the model sees the batch
# What torch 2.13 warns when torchdata 0.11's StatefulDataLoader.__init__ calls torch.set_vital (a no-op now).
SET_VITAL_WARNING = "'set_vital' is deprecated, please do not call"


class IndexedSamples(torch.utils.data.Dataset):
    """The training set, each sample carrying its index (:data:`SAMPLE_INDEX`) to the ledger."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], SAMPLE_INDEX: index}


class IndexedCollator:
    """The stage's collator, plus the micro-batch's sample indices as :data:`SAMPLE_INDICES`."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [feature.pop(SAMPLE_INDEX) for feature in features]
        batch = self.collate(features)
        batch[SAMPLE_INDICES] = torch.tensor(indices, dtype=torch.long)
        return batch


class TrainLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over the global order; ``set_epoch`` reaches its batch sampler.

    Built without torch's deprecation warning for ``torch.set_vital``, which torchdata 0.11 (its last
    release) calls in every loader's constructor: the call does nothing in torch 2.13, the warning
    names nothing a user can change, and it printed at every run start. Only that message, of that
    category, raised from torchdata's loader module, is silenced, and only while the loader is built.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=re.escape(SET_VITAL_WARNING),
                category=UserWarning,
                module=r"torchdata\.stateful_dataloader\.",
            )
            super().__init__(*args, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: leave SIGTERM/SIGINT/SIGHUP to the rank that owns it.

    A scheduler (``scancel``, ``timeout``, Ctrl-C) signals the whole process group, workers too, and
    the launcher signals every process running the entry file; a worker that died of it would crash
    its rank before the rank saved its checkpoint. The rank stops its workers itself
    (:func:`stop_loader_workers`); a worker whose rank died exits by itself (torch's watchdog).
    """
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)


def stop_loader_workers(loader: StatefulDataLoader) -> None:
    """Stop ``loader``'s workers the graceful way (each is told to finish; no signal).

    Registered with ``atexit`` when the loader is made, so it runs before multiprocessing's own exit
    handler, which would SIGTERM the workers (ignored, see :func:`ignore_stop_signals`) and then wait
    for them forever. The loader keeps its last iterator (for ``state_dict``), so its workers outlive
    the epoch loop.
    """
    shutdown_loader_workers(loader)


def share_tied_entries(state_dict: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``state_dict`` with the entries of parameters ``model`` ties together made one tensor again.

    ``save_pretrained`` finds tied weights by shared storage and writes them once; the copies a
    DeepSpeed save passes have lost that sharing. The model's own parameter objects say which
    names are one weight (``named_parameters(remove_duplicate=False)``).

    >>> layer = torch.nn.Linear(2, 2); model = torch.nn.ModuleDict({"a": layer, "b": torch.nn.Linear(2, 2)})
    >>> model["b"].weight = layer.weight
    >>> copies = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    >>> shared = share_tied_entries(copies, model)
    >>> shared["a.weight"] is shared["b.weight"], shared["a.bias"] is shared["b.bias"]
    (True, False)
    """
    names_by_parameter: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_parameter.setdefault(id(parameter), []).append(name)
    shared = dict(state_dict)
    for names in names_by_parameter.values():
        present = [name for name in names if name in shared]
        for name in present[1:]:
            shared[name] = shared[present[0]]
    return shared


class LlmTrainer(Trainer):
    """The HF Trainer plus a data-order ledger, the non-finite guard and the fault-injection points.

    A non-finite gradient norm never reaches the weights: DeepSpeed's ZeRO optimizer skips such
    an update itself (its overflow check covers fp32, fp16 and bf16); without DeepSpeed the
    gradients are dropped before ``optimizer.step()``. So a NaN micro-batch costs its whole
    optimizer step (all micro-batches of it) under ``nonfinite_policy: skip``.

    Training data is read through torchdata's ``StatefulDataLoader`` in the global order of
    :mod:`llmtrain.data.order` (a function of the seed and the global sample index, the same for any
    rank count at the same global batch): every checkpoint holds each rank's loader state
    (``dataloader/rank-R.pt``, written by :class:`LoaderStateCallback`), and a resume restores it, or,
    on another rank count, positions the order at the checkpoint's step; nothing is replayed or
    skipped. Everything else (loss, DeepSpeed, resume of model/optimizer/scheduler/RNG state) is the
    stock Trainer's.

    The private Trainer methods overridden here are listed in :data:`llmtrain.compat.TRAINER_OVERRIDES`
    with why each stays; ``tests/unit/test_compat.py::test_private_trainer_methods``
    checks that each still exists with the parameters these overrides take.
    """

    def __init__(self, *args: Any, step_guard: StepGuardCallback, ledger: DataLedger, faults: FaultInjector,
                 token_counter: TokenCounter, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter
        self.step_guard = step_guard
        self.ledger = ledger
        self.faults = faults

    def get_train_dataloader(self) -> TrainLoader:
        """This rank's share of the global order (:class:`GlobalOrderBatchSampler`), through a ``StatefulDataLoader``.

        Not sharded by accelerate: the batch sampler already gives this rank its samples.
        """
        dataset = self.train_dataset
        if isinstance(dataset, datasets.Dataset):
            dataset = remove_unused_columns(self, dataset, "training")
        args = self.args
        sampler = GlobalOrderBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            micro_batch=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
            rank=args.process_index,
            world_size=args.world_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        workers = args.dataloader_num_workers
        loader = TrainLoader(
            IndexedSamples(dataset),
            batch_sampler=sampler,
            collate_fn=IndexedCollator(self.data_collator),
            num_workers=workers,
            worker_init_fn=ignore_stop_signals,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
        )
        if workers > 0:
            atexit.register(stop_loader_workers, loader)
        return loader

    def position_train_loader(self, loader: TrainLoader, checkpoint: Path) -> None:
        """Put ``loader`` where ``checkpoint`` left off: its saved state for this rank, else the order's position.

        The saved state is used when it was written for this rank with the same layout (world size,
        batch, accumulation, samples, seed); otherwise (another rank count) the global order is
        positioned at the checkpoint's step, the same samples whatever the rank count.
        """
        sampler: GlobalOrderBatchSampler = loader.batch_sampler
        step = self.state.global_step
        sampler.resume_at(step)
        saved = checkpoint / LOADER_STATE_DIR / f"rank-{self.args.process_index}.pt"
        at_epoch_start = sampler.start_step == 0  # the saved state is the end of the previous epoch: start afresh
        if saved.is_file() and not at_epoch_start:
            state = torch.load(saved, weights_only=True)
            if state.get("geometry") == sampler.geometry() and state.get("global_step") == step:
                loader.load_state_dict(state["loader"])
                logger.info("restored the data loader state of rank %d from %s", self.args.process_index, saved)
                return
            geometry = state.get("geometry") or {}
            saved_batch = math.prod(geometry.get(key, 0) for key in ("micro_batch", "accumulation", "world_size"))
            if saved_batch != sampler.global_batch:
                logger.warning(
                    "the global batch changed from %d to %d samples: the data order continues at step %d of the new "
                    "batch size, not at the same sample (it is exact only at the same global batch)",
                    saved_batch, sampler.global_batch, step,
                )  # fmt: skip
            logger.info("the data loader state in %s was saved with another layout: positioning by step", saved)
        logger.info(
            "data order resumes at step %d of epoch %d (global sample position %d)",
            sampler.start_step, sampler.epoch, sampler.start_step * sampler.global_batch,
        )  # fmt: skip

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        padded = inputs.pop(PADDED_POSITIONS, None)  # a count for the token counter, not a model input
        # Set by the Trainer's eval under use_liger_kernel for Liger's patched loss forward, which stays off here.
        inputs.pop("skip_logits", None)
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        if len(self.ledger.pending) == 1:  # the first micro-batch of this step is back-propagated by now
            self.faults.maybe_kill("kill_in_accumulation", step)
        micro_batch = len(self.ledger.pending)
        self.ledger.record(inputs, inputs.pop(SAMPLE_INDICES, None))
        self.token_counter.observe(inputs, padded_positions=padded)
        loss: Any = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if micro_batch == 0 and self.args.process_index == 0 and self.faults.armed("nan_loss", step):
            loss = loss * float("nan")
        # Checked at the step's end. A NaN/inf loss is back-propagated as it is, so every rank runs the
        # same collectives; its gradients make the step's gradient norm non-finite, and that update is skipped.
        self.step_guard.watch_loss(loss)
        return loss

    # Overrides a private Trainer method; contract: tests/unit/test_compat.py::test_private_trainer_methods
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The stock save; a full disk ends the run with one clear error (:class:`~llmtrain.errors.StorageFull`).

        The Trainer's own rotation never runs: its ``save_total_limit`` is None, the user's limit is
        ``args.checkpoint_limit``, applied by :class:`CompleteCheckpointCallback` after the marker.
        """
        with reporting_full_disk(Path(str(self.args.output_dir)) / f"checkpoint-{self.state.global_step}"):
            super()._save_checkpoint(model, trial)

    # Overrides a private Trainer method; contract: tests/unit/test_compat.py::test_private_trainer_methods
    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """The stock save, with tied weights written once and files readable as the umask says.

        DeepSpeed hands the Trainer a state dict of copies, so ``save_pretrained`` no longer sees
        that ``lm_head.weight`` is ``embed_tokens.weight`` and writes both (+545 MB at 0.5B in fp32).
        safetensors creates its files 0600 (:func:`llmtrain.paths.apply_umask`).
        """
        if state_dict is not None:
            state_dict = share_tied_entries(state_dict, self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            apply_umask(Path(str(output_dir if output_dir is not None else self.args.output_dir)))

    # Overrides a private Trainer method; contract: tests/unit/test_compat.py::test_private_trainer_methods
    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """The stock epoch, resumed by the loader's position, unless the run already reached ``max_steps``.

        A run resumed from a checkpoint at its last step (killed while saving its final model) would
        otherwise skip to that step inside the epoch and train one step more than asked. With the
        loop left at once, ``train()`` returns and the final save is all that happens. In the epoch
        a run resumes in, the train loader is positioned from the checkpoint
        (:meth:`position_train_loader`) and the stock skip is a no-op
        (:func:`llmtrain.compat.trainer_skips_no_batches`, which says why ``ignore_data_skip`` is not enough).
        """
        if self.state.global_step >= self.state.max_steps:
            logger.info(
                "step %d already reaches max_steps=%d: nothing left to train; finishing the final save only",
                self.state.global_step,
                self.state.max_steps,
            )
            self.control.should_training_stop = True
            return
        loader, checkpoint = kwargs.get("train_dataloader"), kwargs.get("resume_from_checkpoint")
        resuming = kwargs.get("epoch") == kwargs.get("epochs_trained") and checkpoint is not None
        if resuming and isinstance(loader, TrainLoader) and not self.args.ignore_data_skip:
            self.position_train_loader(loader, Path(str(checkpoint)))
            with trainer_skips_no_batches():
                super()._run_epoch(*args, **kwargs)
            return
        super()._run_epoch(*args, **kwargs)

    # Overrides a private Trainer method; contract: tests/unit/test_compat.py::test_private_trainer_methods
    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            if not self.is_deepspeed_enabled:
                model.zero_grad(set_to_none=True)  # optimizer.step() leaves parameters without gradients alone
            self.step_guard.report_nonfinite(
                self.state.global_step + 1, f"gradient norm {float(norm)}; this optimizer update is skipped"
            )
        return norm


class LoaderStateCallback(TrainerCallback):
    """After every checkpoint save, on every rank: that rank's loader state, ``dataloader/rank-R.pt`` in the checkpoint.

    The state is the ``StatefulDataLoader``'s (its position in the global order, its workers'
    states), with the order's geometry and the step, so :meth:`LlmTrainer.position_train_loader`
    can tell whether it fits the resumed run. It must run before :class:`CompleteCheckpointCallback`
    (the marker lists every file) and before the throughput callback (the save's time is not
    training time): it comes first among the run's callbacks.
    """

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(train_dataloader, TrainLoader):
            return
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        with reporting_full_disk(checkpoint):
            (checkpoint / LOADER_STATE_DIR).mkdir(parents=True, exist_ok=True)
            saved = {
                "loader": train_dataloader.state_dict(),
                "geometry": train_dataloader.batch_sampler.geometry(),
                "global_step": state.global_step,
            }
            torch.save(saved, checkpoint / LOADER_STATE_DIR / f"rank-{args.process_index}.pt")


class RunRecordCallback(TrainerCallback):
    """Appends each step's data-order ledger line and fires the step-level fault points."""

    def __init__(self, ledger: DataLedger, faults: FaultInjector) -> None:
        self.ledger = ledger
        self.faults = faults

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.faults.first_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.ledger.end_step(state.global_step)
        self.faults.maybe_kill("kill_after_step", state.global_step)


def use_liger_kernels(args: TrainArguments) -> None:
    """Settle ``use_liger_kernel`` (the Trainer's flag) for this machine before the Trainer applies it.

    Where Liger's kernels cannot run (not installed, no CUDA) the flag is switched off with a
    warning; the Trainer itself would raise. Where they can, Liger patches RMSNorm, RoPE and SwiGLU,
    and its loss patches stay off unless ``liger_kernel_config`` asks for them: the loss is
    ``loss_implementation``'s, one setting (``auto`` takes Liger's fused linear cross-entropy there).
    """
    if not args.use_liger_kernel:
        return
    problem = liger_kernels_problem(args.use_cpu)
    if problem is not None:
        logger.warning("use_liger_kernel: %s; training without Liger's kernels", problem)
        args.use_liger_kernel = False
        return
    loss_patches = {"fused_linear_cross_entropy": False, "cross_entropy": False}
    args.liger_kernel_config = {**loss_patches, **(args.liger_kernel_config or {})}


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    manifest: dict[str, Any],
    sequence_length: int | None = None,
) -> LlmTrainer:
    """A Trainer with complete-checkpoint marking, the step guard, the ledger, perplexity and SwanLab.

    ``manifest`` (see :mod:`llmtrain.run.manifest`) is written into every checkpoint; its ``run_id``
    names the SwanLab run. ``sequence_length`` (the stage's row length) sets the attention term of
    the MFU logged during training; without it no MFU is logged.
    """
    eval_strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is None and eval_strategy != "no":
        raise ConfigError(
            f"eval_strategy={eval_strategy!r} but there is no validation data: set "
            "validation_files or validation_split_percentage > 0, or eval_strategy: 'no'"
        )
    faults = FaultInjector(Path(str(args.output_dir)))
    ledger = DataLedger(Path(str(args.output_dir)), args.process_index, args.world_size)
    step_guard = StepGuardCallback(args.nonfinite_policy)
    token_counter = TokenCounter()
    if args.loss_implementation != "standard":
        enable_memory_efficient_loss(model, backend=args.loss_implementation)
    use_liger_kernels(args)
    return LlmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[
            LoaderStateCallback(),  # first: its file is in the checkpoint before anything else reacts to the save
            PerplexityCallback(),
            ThroughputCallback(token_counter, model.config, sequence_length),  # before SwanLab, which logs its keys
            RunRecordCallback(ledger, faults),  # the step's ledger line is written before a guard can stop
            step_guard,
            CompleteCheckpointCallback(
                keep=args.checkpoint_limit, manifest=manifest, faults=faults, checksums=args.checkpoint_checksums
            ),
            *swanlab_callbacks(args, manifest["config"], manifest["run_id"]),
        ],
        token_counter=token_counter,
        step_guard=step_guard,
        ledger=ledger,
        faults=faults,
    )
