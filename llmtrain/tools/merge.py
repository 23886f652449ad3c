"""Merge a LoRA adapter into its base model, and check that merging changed nothing before saving.

    python -m llmtrain.tools.merge --adapter outputs/sft-lora --output outputs/sft-merged
    python -m llmtrain.tools.merge --adapter outputs/sft-lora --output outputs/sft-merged --base outputs/pretrain-tiny

The base (``--base``, by default the adapter config's ``base_model_name_or_path``) is loaded in
float32 from safetensors and the adapter applied with PEFT. Logits on fixed probe inputs (a sample
sentence, and a conversation rendered with the chat template) are computed before and after
``merge_and_unload()``; unless they agree within ``--tolerance`` nothing is written. The merged model
is saved, with the adapter dir's tokenizer and chat template, into a temporary sibling of
``--output`` that is renamed into place at the end, so ``--output`` is never half-written. An
existing non-empty ``--output`` is refused.

Why a tolerance of 1e-4 (float32): the adapter computes ``Wx + s·B(Ax)`` and the merged layer
``(W + s·BA)x``; in exact arithmetic they are equal, in float32 (epsilon 1.2e-7) they differ by
rounding only: on the tiny 4-layer model the logits end up 0.7e-6 to 1.0e-6 apart (measured, three
seeds). A wrong merge (a target module left out, a wrong scaling, the adapter dropped) moves them by
orders of magnitude more: dropping the test adapter (rank 4 on q/v) moves them by 1.3 to 1.5. Deep
models with large logits accumulate more rounding; raise ``--tolerance`` there rather than skip it.

The check runs in float32 whatever the checkpoint's dtype; the merged weights are then saved in
the base checkpoint's dtype (``--dtype`` to choose another), a rounding any save in that dtype has.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from llmtrain.cli import run_cli
from llmtrain.errors import ConfigError, UserInputError
from llmtrain.modeling import load_tokenizer
from llmtrain.multimodal import MultimodalBase
from llmtrain.paths import apply_umask
from llmtrain.run.manifest import MANIFEST_FILE
from llmtrain.tiny_default import IM_END
from llmtrain.tools.chat import (
    apply_adapter,
    encode_chat,
    has_tokenizer,
    load_model,
    multimodal_base,
    read_adapter_config,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4  # max |logit difference| allowed in float32; see the module docstring
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Return the number of items in the list."
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does this function return?"},
    {"role": "assistant", "content": "It returns a list of the names it found."},
]


class MergeMismatchError(UserInputError):
    """The merged model's logits differ from the adapter's: the merge would change the model."""


def probe_inputs(tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """Fixed ``[1, T]`` id tensors: the sample text, and the probe conversation when there is a template."""
    probes = [tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]]
    if tokenizer.chat_template:
        probes.append(encode_chat(tokenizer, PROBE_CONVERSATION, add_generation_prompt=False)["input_ids"])
    return probes


def probe_logits(model: Any, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of ``model`` (eval mode, no dropout) on each probe."""
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in probes]


def max_logit_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Largest absolute element-wise difference over all probes (inf if any value is not finite)."""
    worst = 0.0
    for a, b in zip(first, second, strict=True):
        difference = (a - b).abs().max().item()
        if difference != difference:  # NaN never compares equal to itself
            return float("inf")
        worst = max(worst, difference)
    return worst


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is a file or a non-empty dir (an empty dir is replaced)."""
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
        raise UserInputError(f"--output {output_dir} already exists and is not empty; choose a new dir")


def resolve_base(adapter_config: dict[str, Any], adapter_dir: Path, base_dir: str | None) -> str:
    """``base_dir`` if given, else the base model the adapter records."""
    base = base_dir or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserInputError(f"{adapter_dir}: the adapter config names no base_model_name_or_path; pass --base")
    if base_dir is None and not Path(base).exists():
        if Path(base).is_absolute() or len(Path(base).parts) > 2 or base.startswith("."):
            raise UserInputError(
                f"{adapter_dir}: the adapter's base model {base} does not exist here (a path is relative to the "
                "directory training ran in); pass --base with the base model's path or hub id"
            )
        logger.info("%s is not a local path: loading it as a hub id (--base names another base)", base)
    return str(base)


def save_dtype(base: str, dtype: str) -> torch.dtype:
    """``dtype`` by name, or for ``auto`` the dtype the base checkpoint was saved in (float32 if unstated)."""
    if dtype != "auto":
        if dtype not in SAVE_DTYPES:
            raise ConfigError(f"dtype must be auto or one of {sorted(SAVE_DTYPES)}, got {dtype}")
        return SAVE_DTYPES[dtype]
    try:
        stated = getattr(AutoConfig.from_pretrained(base, trust_remote_code=False), "dtype", None)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot load a model config from {base} (--base names another base): {error}") from error
    if isinstance(stated, str):
        stated = SAVE_DTYPES.get(stated)
    return stated if isinstance(stated, torch.dtype) else torch.float32


def save_atomically(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    extra_files: tuple[Path, ...] = (),
    published: MultimodalBase | None = None,
) -> None:
    """Save into a temporary sibling dir (with copies of ``extra_files``), then rename it to ``output_dir``.

    An empty ``output_dir`` is replaced. With ``published`` (the multimodal checkpoint ``model`` is
    the text model of) the save gets that checkpoint's layout (:meth:`MultimodalBase.publish`).
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.merging-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        if published is not None:
            published.publish(staging, model)
        tokenizer.save_pretrained(staging)
        for path in extra_files:
            shutil.copy2(path, staging / path.name)
        apply_umask(staging)  # mkdtemp made it 0700 and safetensors writes 0600: readable as any save_pretrained output
        check_output_dir(output_dir)
        if output_dir.is_dir():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def merge_adapter(
    adapter_dir: Path,
    output_dir: Path,
    base_dir: str | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    dtype: str = "auto",
) -> float:
    """Merge the LoRA adapter in ``adapter_dir`` into its base and save the result to ``output_dir``.

    Returns the largest absolute logit difference between the adapter-wrapped and the merged model
    on the probe inputs. Raises :class:`MergeMismatchError` (writing nothing) when it exceeds
    ``tolerance``, and :class:`UserInputError` for an unusable adapter, base or ``output_dir``.
    The tokenizer and chat template saved with the model are the adapter dir's (the base's, with a
    warning, when the adapter dir has none); with a ChatML tokenizer, the saved generation config
    stops at ``<|im_end|>`` as well as EOS. The adapter's ``run_manifest.json`` is copied along, so
    the merged model says what trained it and chats with the same ``chat_template_kwargs``.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if tolerance < 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
    check_output_dir(output_dir)
    base = resolve_base(read_adapter_config(adapter_dir), adapter_dir, base_dir)
    target_dtype = save_dtype(base, dtype)
    if has_tokenizer(adapter_dir):
        tokenizer = load_tokenizer(adapter_dir)
    else:
        logger.warning("%s has no tokenizer; saving the base model's tokenizer from %s", adapter_dir, base)
        tokenizer = load_tokenizer(base)
    if not tokenizer.chat_template:
        logger.warning("the tokenizer has no chat template; the merged model will have none either")

    logger.info("merging adapter %s into base %s (checked in float32)", adapter_dir, base)
    published = multimodal_base(base)
    model = apply_adapter(load_model(base, dtype=torch.float32), adapter_dir, published)
    probes = probe_inputs(tokenizer)
    with model.disable_adapter():
        base_logits = probe_logits(model, probes)
    adapter_logits = probe_logits(model, probes)
    effect = max_logit_difference(base_logits, adapter_logits)
    if effect == 0.0:
        logger.warning("the adapter does not change the base model's logits at all (untrained adapter?)")
    merged = model.merge_and_unload(safe_merge=True)
    difference = max_logit_difference(adapter_logits, probe_logits(merged, probes))
    logger.info(
        "max |logit difference| merged vs adapter: %.3g (the adapter itself moves them %.3g)", difference, effect
    )
    if not difference <= tolerance:
        raise MergeMismatchError(
            f"merging {adapter_dir} into {base} changes the model: max |logit difference| {difference:.3g} > "
            f"tolerance {tolerance:.1g}; nothing was written"
        )

    if tokenizer.chat_template and IM_END in tokenizer.get_vocab():
        merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    manifest = adapter_dir / MANIFEST_FILE
    save_atomically(
        merged.to(target_dtype), tokenizer, output_dir, (manifest,) if manifest.is_file() else (), published
    )
    logger.info("saved the merged model (%s) to %s", str(target_dtype).removeprefix("torch."), output_dir)
    return difference


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path, help="the LoRA adapter dir a fine-tuning run saved")
    parser.add_argument("--output", required=True, type=Path, help="where the merged model goes (new or empty dir)")
    parser.add_argument("--base", help="base model dir (default: the adapter config's base_model_name_or_path)")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max |logit difference| merged vs adapter"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *SAVE_DTYPES], help="saved dtype (auto: the base checkpoint's)"
    )
    args = parser.parse_args(argv)
    merge_adapter(args.adapter, args.output, args.base, tolerance=args.tolerance, dtype=args.dtype)


if __name__ == "__main__":
    sys.exit(run_cli(main))
