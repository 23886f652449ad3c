"""Every hook into a dependency's internals, in one place, each with why no public seam replaces it.

The stack is pinned exactly (``requirements.txt``) and a private attribute may change in any release.
Each hook here has a contract test in ``tests/unit/test_compat.py`` that fails, naming the hook and
what changed, when the installed version no longer has what the hook relies on (a signature, an
attribute, a behaviour): an upgrade then costs one failing test, not a silent mis-resume. The rest
of the package reaches these internals only through this module. The one exception is
:class:`llmtrain.run.trainer.LlmTrainer`'s overrides of private ``Trainer`` methods, which can only
live in the subclass: :data:`TRAINER_OVERRIDES` lists them with the parameters each relies on, and
their contract test checks the list against both classes.

Hooks replaced by public seams (issue 25), so not here:

* the user's ``save_total_limit`` is held by the project (``TrainArguments.checkpoint_limit``, applied by
  :func:`llmtrain.run.checkpoints.rotate`); the Trainer's field stays None, so its own rotation never
  runs, and nothing is switched off around each save or rewritten afterwards;
* each rank's data-loader state is saved by an ``on_save`` callback from the ``train_dataloader`` the
  Trainer hands to every callback, not inside ``_save_checkpoint``;
* SwanLab's run id and resume mode reach ``swanlab.init`` through the project's own call of it, made
  before SwanLab's callback would make one, not through the callback's ``_init_kwargs``.

Library imports are inside the functions: this module is a leaf of the package's layers, importable
from any of them without loading torch, transformers or DeepSpeed before a hook is used.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

# LlmTrainer's overrides of private transformers.Trainer methods -> the parameters (after self) each
# override receives and passes on. Why each stays (no public seam in transformers 5.23):
# - _save_checkpoint: the stock save inside one full-disk report (StorageFull); the Trainer has no hook
#   before a save, and on_save runs after it.
# - _save: the state dict DeepSpeed hands over holds copies, so tied weights would be written twice, and
#   safetensors files come out 0600; save_model offers no seam between gathering and writing.
# - _run_epoch: a run resumed at max_steps must train nothing (the stock loop trains one step more), and a
#   resumed epoch starts where the loader was positioned (see trainer_skips_no_batches).
# - _get_grad_norm: the one place the step's gradient norm is known before optimizer.step(), so a
#   non-finite update can be dropped (callbacks' on_pre_optimizer_step does not receive the norm).
TRAINER_OVERRIDES: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_save": ("output_dir", "state_dict"),
    "_run_epoch": (
        "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
        "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
        "steps_trained_in_current_epoch",
    ),
    "_get_grad_norm": ("model", "grad_norm"),
}  # fmt: skip


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions, one per option (argparse keeps the list private as ``_actions``).

    Why: ``HfArgumentParser`` makes the actions from the argument dataclasses; the YAML reader
    (each key's ``nargs``), the did-you-mean hints (option strings) and the bare-boolean rule
    (``nargs``/``const`` set on ``bool | None`` fields) read or adjust them, and argparse offers no
    public list. Rebuilding them from the dataclasses would duplicate HfArgumentParser's type rules.
    """
    # contract: tests/unit/test_compat.py::test_argparse_keeps_its_actions
    return parser._actions


def shutdown_loader_workers(loader: Any) -> None:
    """Stop the workers of ``loader``'s live iterator the graceful way (each told to finish; no signal).

    Why: a torch ``DataLoader`` stops its workers only when its iterator is exhausted or garbage
    collected, and torchdata's ``StatefulDataLoader`` keeps its last iterator (for ``state_dict``);
    torch has no public call that stops a live iterator's workers. Nothing happens when the loader
    has no iterator, or one without workers.
    """
    # contract: tests/unit/test_compat.py::test_a_loaders_workers_can_be_stopped
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@contextlib.contextmanager
def trainer_skips_no_batches() -> Iterator[None]:
    """While open, ``Trainer._run_epoch``'s skip over a resumed epoch's trained batches returns the loader as is.

    Why: the train loader is already positioned from the checkpoint (its saved state, or the global
    order at the checkpoint's step), and the stock skip (accelerate's ``skip_first_batches``) would
    rebuild it as a plain ``DataLoader`` and skip again. The public alternative,
    ``ignore_data_skip``, also drops what the epoch loop derives from the skip count: the step
    counter that places a partial accumulation's gradient sync at the epoch's end, the fractional
    ``state.epoch`` logged and saved, and the RNG state restored after the first batches are drawn
    (bit-identical resume depends on all three). So the stock loop runs with its skip made a no-op.
    """
    import transformers.trainer

    # contract: tests/unit/test_compat.py::test_the_epoch_loop_skips_by_a_module_global
    original = transformers.trainer.skip_first_batches
    transformers.trainer.skip_first_batches = lambda dataloader, num_batches=0: dataloader
    try:
        yield
    finally:
        transformers.trainer.skip_first_batches = original


def remove_unused_columns(trainer: Any, dataset: Any, description: str) -> Any:
    """``dataset`` without the columns the model's ``forward`` does not take, as the stock loaders do it.

    Why: the train loader is this project's (a ``StatefulDataLoader`` over the global order), so the
    stock ``get_train_dataloader``, which calls this, is not used; the column rule
    (``remove_unused_columns``, ``label_names``, PEFT-wrapped signatures) stays the Trainer's.
    """
    # contract: tests/unit/test_compat.py::test_private_trainer_methods
    return trainer._remove_unused_columns(dataset, description=description)


@contextlib.contextmanager
def without_deepspeed_zero3_init() -> Iterator[None]:
    """While open, transformers builds models as if no DeepSpeed config were registered (no ``zero.Init``).

    Why: parsing ``--deepspeed`` with a ZeRO-3 config registers it process-wide (a weak reference in
    ``transformers.integrations.deepspeed``), and every model is then built inside
    ``deepspeed.zero.Init``, which needs the ranks' process group. transformers offers
    ``unset_hf_deepspeed_config`` but no public way to read the registration back, so it is saved
    and restored by hand.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    # contract: tests/unit/test_compat.py::test_the_deepspeed_registration_can_be_suspended
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def load_universal_checkpoint(deepspeed_plugin: Any) -> None:
    """Make the coming ``deepspeed.initialize`` load checkpoints in DeepSpeed's universal format.

    Why: the switch is a key of the DeepSpeed config (``checkpoint.load_universal``), and the
    Trainer is built before the resume checkpoint's rank count is compared; accelerate reads the
    config dict its plugin holds when it prepares the model, so the key is set in that dict, in
    place. Neither accelerate nor the Trainer has a public setter for it.
    """
    # contract: tests/unit/test_compat.py::test_the_deepspeed_plugin_config_is_read_at_prepare
    config = deepspeed_plugin.hf_ds_config.config
    config.setdefault("checkpoint", {})["load_universal"] = True


def skip_deepspeed_shm_op() -> None:
    """Tell DeepSpeed its shared-memory comm op cannot be built here, so it never compiles it.

    Why: on CPU, ``deepspeed.comm`` builds that op (a ~50 s C++ build on a cold cache) only to serve
    inference all-reduce; it asks ``deepspeed.ops.__compatible_ops__`` first, a probe cache that
    DeepSpeed keeps as one dict "so edits to it persist", and no setting turns the op off.
    """
    import deepspeed.ops

    # contract: tests/unit/test_compat.py::test_deepspeed_asks_its_op_cache_before_building_the_shm_op
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
