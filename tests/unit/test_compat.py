"""Contract tests of :mod:`llmtrain.compat`: each dependency internal the project relies on is still there, and acts so.

One test per hook (and one for ``LlmTrainer``'s overrides of private Trainer methods). A failure
names the hook and what the installed version changed: read the hook's docstring in
``llmtrain/compat.py`` for why it exists, then adapt it (or replace it by a public seam) before
upgrading the pin.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import multiprocessing
import textwrap
from pathlib import Path

import pytest
import transformers.trainer
from transformers import Trainer

from llmtrain import compat
from llmtrain.run.trainer import LlmTrainer, TrainLoader


def parameters(function: object) -> tuple[str, ...]:
    """The parameter names of a method, ``self`` left out."""
    return tuple(name for name in inspect.signature(function).parameters if name != "self")  # type: ignore[arg-type]


def calls_to(function: object, name: str) -> list[ast.Call]:
    """The calls in ``function``'s source whose callee ends in ``name`` (``self.name(...)`` or ``name(...)``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = node.func
            called = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
            if called == name:
                found.append(node)
    return found


def test_argparse_keeps_its_actions() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--flag", type=str)
    actions = compat.parser_actions(parser)
    assert isinstance(actions, list) and {action.dest for action in actions} == {"help", "flag"}, (
        "compat.parser_actions: argparse no longer keeps its actions as the list parser._actions"
    )
    flag = next(action for action in actions if action.dest == "flag")
    flag.nargs, flag.const = "?", "bare"  # what llmtrain.config.parser's bare-boolean rule does
    assert parser.parse_args(["--flag"]).flag == "bare", (
        "compat.parser_actions: changing an action's nargs/const no longer changes how argparse parses it"
    )


def test_a_loaders_workers_can_be_stopped() -> None:
    loader = TrainLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True)
    compat.shutdown_loader_workers(loader)  # no iterator yet: nothing to do
    before = set(multiprocessing.active_children())
    next(iter(loader))
    started = set(multiprocessing.active_children()) - before
    iterator = getattr(loader, "_iterator", None)
    assert callable(getattr(iterator, "_shutdown_workers", None)), (
        "compat.shutdown_loader_workers: the StatefulDataLoader no longer keeps its live iterator as _iterator "
        "with a _shutdown_workers method"
    )
    assert started, "the loader's worker did not start"
    compat.shutdown_loader_workers(loader)
    assert not started & set(multiprocessing.active_children()), (
        "compat.shutdown_loader_workers: the loader's worker is still running"
    )


def test_the_epoch_loop_skips_by_a_module_global() -> None:
    run_epoch = Trainer._run_epoch
    assert callable(getattr(transformers.trainer, "skip_first_batches", None)), (
        "compat.trainer_skips_no_batches: transformers.trainer no longer has a module global skip_first_batches"
    )
    assert {"skip_first_batches", "ignore_data_skip"} <= set(run_epoch.__code__.co_names), (
        "compat.trainer_skips_no_batches: Trainer._run_epoch no longer skips a resumed epoch's batches through the "
        "module global skip_first_batches (unless ignore_data_skip); the resumed epoch would start elsewhere"
    )
    original = transformers.trainer.skip_first_batches
    loader = object()
    with compat.trainer_skips_no_batches():
        assert transformers.trainer.skip_first_batches(loader, 3) is loader
    assert transformers.trainer.skip_first_batches is original


def test_private_trainer_methods() -> None:
    for name, expected in compat.TRAINER_OVERRIDES.items():
        assert hasattr(Trainer, name), f"Trainer.{name}, which LlmTrainer overrides, is gone"
        assert parameters(getattr(Trainer, name)) == expected, (
            f"Trainer.{name} now takes {parameters(getattr(Trainer, name))}, LlmTrainer's override expects {expected}"
        )
    overridden = {
        name
        for name in vars(LlmTrainer)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert overridden == set(compat.TRAINER_OVERRIDES), (
        "list LlmTrainer's private overrides in compat.TRAINER_OVERRIDES"
    )
    # LlmTrainer._run_epoch reads its arguments by keyword: a positional call would leave a resume unpositioned.
    (call,) = calls_to(Trainer._inner_training_loop, "_run_epoch")
    keywords = {keyword.arg for keyword in call.keywords}
    assert not call.args and {"epoch", "train_dataloader", "resume_from_checkpoint", "epochs_trained"} <= keywords, (
        "Trainer._inner_training_loop no longer calls _run_epoch with these keyword arguments"
    )
    (call,) = calls_to(Trainer._run_epoch, "_get_grad_norm")
    assert [keyword.arg for keyword in call.keywords] == ["grad_norm"], "Trainer calls _get_grad_norm differently"
    assert parameters(Trainer._remove_unused_columns) == ("dataset", "description"), (
        "compat.remove_unused_columns: Trainer._remove_unused_columns(dataset, description) changed"
    )


def test_the_trainers_own_rotation_is_off_without_a_save_total_limit(tmp_path: Path) -> None:
    from transformers.trainer_utils import rotate_checkpoints

    (call,) = calls_to(Trainer._save_checkpoint, "rotate_checkpoints")
    limit = next(keyword.value for keyword in call.keywords if keyword.arg == "save_total_limit")
    assert ast.unparse(limit) == "self.args.save_total_limit", (
        "Trainer._save_checkpoint no longer rotates by args.save_total_limit: is its rotation still off?"
    )
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
    rotate_checkpoints(str(tmp_path), save_total_limit=None, use_mtime=True)
    assert len(list(tmp_path.iterdir())) == 3, "the Trainer's rotation deletes checkpoints without a save_total_limit"


def test_the_deepspeed_registration_can_be_suspended() -> None:
    from transformers.integrations import deepspeed as hf_deepspeed

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"), (
        "compat.without_deepspeed_zero3_init: transformers.integrations.deepspeed has no _hf_deepspeed_config_weak_ref"
    )
    config = hf_deepspeed.HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with compat.without_deepspeed_zero3_init():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled(), (
                "compat.without_deepspeed_zero3_init: unset_hf_deepspeed_config no longer turns ZeRO-3 off"
            )
        assert hf_deepspeed.deepspeed_config() is config.config, (
            "compat.without_deepspeed_zero3_init: the registration is not back after the block"
        )
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_the_deepspeed_plugin_config_is_read_at_prepare() -> None:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime import constants
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    plugin = DeepSpeedPlugin(hf_ds_config=HfDeepSpeedConfig({"zero_optimization": {"stage": 2}}))
    compat.load_universal_checkpoint(plugin)
    assert plugin.deepspeed_config.get("checkpoint") == {"load_universal": True}, (
        "compat.load_universal_checkpoint: accelerate's DeepSpeedPlugin.deepspeed_config is no longer the dict its "
        "hf_ds_config holds"
    )
    prepare = inspect.getsource(Accelerator._prepare_deepspeed)
    assert "deepspeed_plugin.deepspeed_config" in prepare and "config_params=self.deepspeed_config" in prepare, (
        "compat.load_universal_checkpoint: Accelerator._prepare_deepspeed no longer hands the plugin's config dict "
        "to deepspeed.initialize"
    )
    assert (constants.CHECKPOINT, constants.LOAD_UNIVERSAL_CHECKPOINT) == ("checkpoint", "load_universal"), (
        "compat.load_universal_checkpoint: DeepSpeed reads the universal-checkpoint switch under another key"
    )


def test_deepspeed_asks_its_op_cache_before_building_the_shm_op() -> None:
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")  # the package's own `torch` is torch

    assert ShareMemCommBuilder.NAME == "deepspeed_shm_comm", (
        f"compat.skip_deepspeed_shm_op: the CPU shm op is now called {ShareMemCommBuilder.NAME!r}"
    )
    assert "__compatible_ops__.get(builder.NAME" in inspect.getsource(deepspeed_torch_comm.build_shm_op), (
        "compat.skip_deepspeed_shm_op: deepspeed.comm no longer asks deepspeed.ops.__compatible_ops__ before "
        "building its shm op"
    )
    import deepspeed.ops

    assert 'globals()["__compatible_ops__"]' in inspect.getsource(deepspeed.ops), (
        "compat.skip_deepspeed_shm_op: deepspeed.ops no longer keeps __compatible_ops__ as one module-level dict"
    )


HOOKS = [
    name for name, value in vars(compat).items() if inspect.isfunction(value) and value.__module__ == compat.__name__
]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_contract_test_and_a_reason(hook: str) -> None:
    function = vars(compat)[hook]
    assert "Why:" in (function.__doc__ or ""), f"compat.{hook}: say why no public seam replaces it"
    source = inspect.getsource(function)
    named = [
        line.split("::")[-1].strip()
        for line in source.splitlines()
        if "# contract: tests/unit/test_compat.py::" in line
    ]
    assert named and all(name in globals() for name in named), f"compat.{hook}: name its contract test in a comment"
