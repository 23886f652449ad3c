"""Talk to a fine-tuned chat model through its own chat template (a smoke test for an SFT run).

One-shot, the answer goes to stdout::

    python -m llmtrain.tools.chat --model outputs/sft-tiny --prompt "What is 2+2?"
    python -m llmtrain.tools.chat --model outputs/pretrain-tiny --adapter outputs/sft-lora --prompt "Hi"

Interactive (no ``--prompt``): one user turn per line of stdin, the conversation history is kept;
``/reset`` clears it (the system prompt stays), ``/exit`` or end of input quits.

The prompt is rendered by ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``, the
template the training conversations were encoded with, with the template keywords the run trained
with (``chat_template_kwargs`` in the run manifest of the adapter or model dir, e.g.
``{"enable_thinking": false}``; ``--chat_template_kwargs '{...}'`` overrides), and generation stops
at ChatML's end of turn ``<|im_end|>`` (or EOS). Decoding is greedy by default; ``--temperature T`` > 0 samples plainly
(no top-k, top-p or repetition penalty), so the answer depends on the arguments only, never on
sampling defaults stored in the checkpoint's ``generation_config.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, BatchEncoding, PreTrainedTokenizerBase

from llmtrain.cli import run_cli
from llmtrain.config.template_kwargs import parse_template_kwargs
from llmtrain.errors import ConfigError, UserInputError
from llmtrain.modeling import check_safetensors_weights, load_tokenizer
from llmtrain.multimodal import MultimodalBase, text_training_config
from llmtrain.run.manifest import read_manifest
from llmtrain.tiny_default import IM_END

if TYPE_CHECKING:
    from llmtrain.data.conversations import Message

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"  # written by PEFT's save_pretrained
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # present wherever save_pretrained wrote a tokenizer
DEFAULT_MAX_NEW_TOKENS = 256
RESET_COMMAND = "/reset"
EXIT_COMMAND = "/exit"
INTERACTIVE_PROMPT = "you> "


class ChatTemplateError(UserInputError):
    """The tokenizer cannot render or end a ChatML turn (no chat template, or no ``<|im_end|>``)."""


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of ``<|im_end|>``, after checking that the tokenizer has a chat template.

    Raises :class:`ChatTemplateError` naming what is missing: without a template there is no
    prompt format the model was trained on, and without ``<|im_end|>`` no end of turn to stop at.
    """
    source = tokenizer.name_or_path or "the tokenizer"
    if not tokenizer.chat_template:
        raise ChatTemplateError(
            f"{source}: the tokenizer has no chat template; chat needs the tokenizer saved by the "
            "fine-tuning run (its chat_template.jinja), not a base model's"
        )
    token_id = tokenizer.get_vocab().get(IM_END)
    if token_id is None:
        raise ChatTemplateError(f"{source}: the tokenizer has no {IM_END} token, so a reply has no end of turn")
    return int(token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``<|im_end|>`` first, then EOS when it is a different token."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def load_model(path: str | Path, dtype: torch.dtype | str = "auto") -> Any:
    """Load a causal LM from safetensors only (no checkpoint code is run), in eval mode.

    A multimodal checkpoint (the published Qwen3.5 layout) loads as its text model, its output
    layer tied as the published class ties it (:func:`llmtrain.multimodal.text_training_config`).
    """
    check_safetensors_weights(path)
    try:
        config = text_training_config(AutoConfig.from_pretrained(str(path), trust_remote_code=False))
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot load a model from {path}: {error}") from error
    return model.eval()


def multimodal_base(path: str | Path) -> MultimodalBase | None:
    """The published multimodal checkpoint at ``path`` whose text model :func:`load_model` loads, else None."""
    try:
        return MultimodalBase.find(str(path), AutoConfig.from_pretrained(str(path), trust_remote_code=False))
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot load a model config from {path}: {error}") from error


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; a dir without one is not a PEFT adapter."""
    path = adapter_dir / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise UserInputError(f"{adapter_dir}: no {ADAPTER_CONFIG_FILE}, so this is not a LoRA adapter dir")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: expected a JSON object")
    return config


def apply_adapter(model: Any, adapter_dir: Path, base: MultimodalBase | None = None) -> Any:
    """Wrap ``model`` with the adapter saved in ``adapter_dir`` (inference mode, eval).

    With ``base`` (the published multimodal checkpoint ``model`` is the text model of), the
    adapter's published module names are mapped onto the text model.
    """
    check_safetensors_weights(adapter_dir)
    key_mapping = base.adapter_key_mapping(model) if base is not None else None
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False, key_mapping=key_mapping).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise UserInputError(f"cannot apply the adapter {adapter_dir}: {error}") from error


def has_tokenizer(directory: Path) -> bool:
    return (directory / TOKENIZER_CONFIG_FILE).is_file()


def load_chat_model(
    model_dir: str | Path, adapter_dir: str | Path | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for chatting, on the GPU when there is one.

    With ``adapter_dir`` the LoRA adapter is applied to ``model_dir`` and the tokenizer comes from
    the adapter dir (the fine-tuning run saved its tokenizer and chat template there), falling back
    to ``model_dir``'s. The tokenizer is checked (chat template, ``<|im_end|>``, vocabulary within
    the embedding) before any weights are read.
    """
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None:
        base = read_adapter_config(adapter).get("base_model_name_or_path")
        if base and Path(base).resolve() != Path(model_dir).resolve():
            logger.warning("the adapter %s was trained on %s; applying it to %s", adapter, base, model_dir)
    tokenizer = load_tokenizer(adapter if adapter is not None and has_tokenizer(adapter) else model_dir)
    end_of_turn_id(tokenizer)
    model = load_model(model_dir)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserInputError(
            f"the tokenizer has {len(tokenizer)} tokens but {model_dir} embeds only "
            f"{model.get_input_embeddings().num_embeddings}: they do not belong together"
        )
    if adapter is not None:
        model = apply_adapter(model, adapter, multimodal_base(model_dir))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def recorded_template_kwargs(model_dir: str | Path, adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``chat_template_kwargs`` the run that produced the weights trained with ({} when none).

    Read from ``run_manifest.json`` of ``adapter_dir`` when given (the fine-tuning run wrote it
    there), else of ``model_dir`` (a full or partial SFT output, or a merged model).
    """
    directory = Path(adapter_dir if adapter_dir is not None else model_dir)
    recorded = read_manifest(directory).get("config", {}).get("chat_template_kwargs")
    return parse_template_kwargs(recorded, f"{directory}/run_manifest.json: chat_template_kwargs") or {}


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> BatchEncoding:
    """``input_ids`` and ``attention_mask`` (``[1, T]`` tensors) of ``messages`` rendered by the chat template.

    ``template_kwargs`` reach the template as in training (:func:`llmtrain.data.chat_masks.render`).
    """
    encoded = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **(template_kwargs or {}),
    )
    assert isinstance(encoded, BatchEncoding)  # return_dict=True
    return encoded


def check_decoding(max_new_tokens: int, temperature: float) -> None:
    """Refuse a non-positive ``max_new_tokens`` or a negative ``temperature``."""
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


def generate_reply_ids(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int,
    temperature: float = 0.0,
    template_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The ids the model generates after ``messages`` (1-D; ends with a stop id unless truncated).

    Greedy when ``temperature`` is 0, plain temperature sampling above (seed torch for
    reproducible samples). Stops at ``<|im_end|>`` or EOS, or after ``max_new_tokens``.
    """
    check_decoding(max_new_tokens, temperature)
    stop_ids = stop_token_ids(tokenizer)
    encoded = encode_chat(tokenizer, messages, add_generation_prompt=True, template_kwargs=template_kwargs).to(
        model.device
    )
    decoding: dict[str, Any] = {"do_sample": temperature > 0, "repetition_penalty": 1.0}
    if temperature > 0:
        decoding.update(temperature=temperature, top_k=0, top_p=1.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[-1]
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **decoding
        )
    return output[0, encoded["input_ids"].shape[1] :].cpu()


def chat_reply(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int,
    temperature: float = 0.0,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """Answer the last turn of ``messages``: ``(text, stopped_at_end_of_turn)``.

    ``text`` is decoded without special tokens and stripped of surrounding whitespace;
    ``stopped_at_end_of_turn`` is True only when the model itself ended the turn with
    ``<|im_end|>`` (False when it ran out of ``max_new_tokens`` or emitted a bare EOS).
    """
    ids = generate_reply_ids(model, tokenizer, messages, max_new_tokens, temperature, template_kwargs)
    stopped = len(ids) > 0 and int(ids[-1]) == end_of_turn_id(tokenizer)
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip(), stopped


def warn_if_unfinished(stopped: bool, max_new_tokens: int) -> None:
    if not stopped:
        logger.warning("the reply did not end with %s within max_new_tokens=%d", IM_END, max_new_tokens)


def start_messages(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    lines: Iterable[str],
    out: TextIO,
    system: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    show_prompt: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[Message]:
    """Multi-turn chat: one user turn per line of ``lines``, each answer a line on ``out``.

    Blank lines are skipped, ``/reset`` clears the history (keeping the system prompt),
    ``/exit`` or the end of ``lines`` quits. Returns the final history.
    """
    history = start_messages(system)
    if show_prompt:
        out.write(INTERACTIVE_PROMPT)
        out.flush()
    for line in lines:
        text = line.strip()
        if text == EXIT_COMMAND:
            break
        if text == RESET_COMMAND:
            history = start_messages(system)
            logger.info("history cleared")
        elif text:
            history.append({"role": "user", "content": text})
            answer, stopped = chat_reply(model, tokenizer, history, max_new_tokens, temperature, template_kwargs)
            history.append({"role": "assistant", "content": answer})
            out.write(answer + "\n")
            warn_if_unfinished(stopped, max_new_tokens)
        if show_prompt:
            out.write(INTERACTIVE_PROMPT)
            out.flush()
    return history


def send_logs_to_stderr() -> None:
    """Move console log handlers from stdout to stderr, so stdout carries only the tool's result.

    ``run_cli``'s logging setup writes to stdout (right for training logs); for chat and compare,
    ``> answers.txt`` must capture the answers alone.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a full model dir, or the base model dir of --adapter")
    parser.add_argument("--adapter", help="a LoRA adapter dir to apply to --model")
    parser.add_argument("--system", help="system prompt (none by default)")
    parser.add_argument("--prompt", help="answer this one user message and exit; without it, chat on stdin")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument(
        "--chat_template_kwargs",
        help="template keywords as JSON, e.g. '{\"enable_thinking\": false}' (default: those the run trained with)",
    )
    args = parser.parse_args(argv)
    send_logs_to_stderr()
    check_decoding(args.max_new_tokens, args.temperature)
    template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    if template_kwargs is None:
        template_kwargs = recorded_template_kwargs(args.model, args.adapter)
    if template_kwargs:
        logger.info("chat template keywords: %s", template_kwargs)
    model, tokenizer = load_chat_model(args.model, args.adapter)
    if args.prompt is not None:
        messages = [*start_messages(args.system), {"role": "user", "content": args.prompt}]
        answer, stopped = chat_reply(model, tokenizer, messages, args.max_new_tokens, args.temperature, template_kwargs)
        sys.stdout.write(answer + "\n")
        warn_if_unfinished(stopped, args.max_new_tokens)
        return
    chat_loop(
        model,
        tokenizer,
        sys.stdin,
        sys.stdout,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        show_prompt=sys.stdin.isatty(),
        template_kwargs=template_kwargs,
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
