"""Answer the same prompts with several models or adapters and show the answers side by side.

    python -m llmtrain.tools.compare --models outputs/sft-tiny outputs/sft-merged \\
        --adapters outputs/pretrain-tiny:outputs/sft-lora \\
        --prompts "What is 2+2?" "Name a colour." --output compare.md
    python -m llmtrain.tools.compare --models outputs/sft-tiny --prompts_file prompts.txt

Each prompt is one user turn (after ``--system`` when given), answered greedily by
:func:`llmtrain.tools.chat.chat_reply`: the model's own chat template, stopping at ``<|im_end|>``.
The result is a Markdown table, one row per prompt and one column per model, each answer ending
with the end-of-turn token the model generated or a cut-off note, written to stdout and, with
``--output``, to a file. Below it, for each model a training run wrote, that run's eval loss
before and after (from its ``train_summary.json``). Models are loaded one at a time, so only one is in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmtrain.cli import run_cli
from llmtrain.errors import ConfigError, UserInputError
from llmtrain.tools.chat import (
    DEFAULT_MAX_NEW_TOKENS,
    chat_reply,
    check_decoding,
    end_of_turn_id,
    load_chat_model,
    recorded_template_kwargs,
    send_logs_to_stderr,
    start_messages,
)

logger = logging.getLogger(__name__)

ModelSpec = tuple[str, str | None]  # (model dir, LoRA adapter dir applied to it or None)
CUT_OFF = "[cut off after {max_new_tokens} tokens: no end of turn]"
SUMMARY_FILE = "train_summary.json"  # a training run's summary (llmtrain.run.output_dir.SUMMARY_FILE)


def eval_loss_line(spec: ModelSpec) -> str | None:
    """What training did to the eval loss of the run that wrote ``spec`` (its first and last evaluation), if recorded.

    >>> import json, tempfile; run = Path(tempfile.mkdtemp())
    >>> _ = (run / SUMMARY_FILE).write_text(json.dumps({"eval_losses": [[0, 5.25], [50, 4.5], [150, 3.0]]}))
    >>> eval_loss_line((str(run), None)).split(": ", 1)[1]
    'eval loss 5.250 at step 0 (before training) -> 3.000 at step 150'
    """
    run_dir = Path(spec[1] if spec[1] is not None else spec[0])
    try:
        losses = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("eval_losses") or []
    except (OSError, ValueError):
        return None
    if len(losses) < 2:
        return None
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    before = " (before training)" if first_step == 0 else ""
    return f"{model_label(spec)}: eval loss {first:.3f} at step {first_step}{before} -> {last:.3f} at step {last_step}"


def model_label(spec: ModelSpec) -> str:
    """Column title: the model dir, plus the adapter dir when there is one."""
    model_dir, adapter_dir = spec
    return model_dir if adapter_dir is None else f"{model_dir} + {adapter_dir}"


def compare(
    models: list[ModelSpec], prompts: list[str], max_new_tokens: int, system: str | None = None
) -> list[list[str]]:
    """Greedy answers to each prompt from each model: ``answers[prompt_index][model_index]``.

    Each answer ends with the end-of-turn token the model generated (``<|im_end|>``), or with
    :data:`CUT_OFF` when ``max_new_tokens`` ran out first: whether a model ends its turn is what
    chat fine-tuning teaches first.

    Each ``(model_dir, adapter_dir)`` is loaded once (see :func:`load_chat_model`) and answers
    every prompt as a fresh single-turn conversation before the next model is loaded, with the
    template keywords its run trained with (:func:`recorded_template_kwargs`).
    """
    check_decoding(max_new_tokens, 0.0)
    answers: list[list[str]] = [[] for _ in prompts]
    for spec in models:
        label = model_label(spec)
        logger.info("answering %d prompts with %s", len(prompts), label)
        model, tokenizer = load_chat_model(*spec)
        template_kwargs = recorded_template_kwargs(*spec)
        for index, prompt in enumerate(prompts):
            messages = [*start_messages(system), {"role": "user", "content": prompt}]
            answer, stopped = chat_reply(model, tokenizer, messages, max_new_tokens, template_kwargs=template_kwargs)
            if not stopped:
                logger.warning("%s: the answer to prompt %d did not end its turn (truncated)", label, index + 1)
            ending = str(tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))) if stopped else CUT_OFF
            answers[index].append(f"{answer} {ending.format(max_new_tokens=max_new_tokens)}")
        del model
    return answers


def markdown_cell(text: str) -> str:
    r"""``text`` made safe for one table cell: pipes escaped, line breaks as ``<br>``.

    >>> markdown_cell("a | b\nc")
    'a \\| b<br>c'
    """
    return text.strip().replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def markdown_table(prompts: list[str], labels: list[str], answers: list[list[str]]) -> str:
    """A Markdown table: a ``prompt`` column, then one column per label; one row per prompt.

    >>> _ = sys.stdout.write(markdown_table(["hi"], ["m1", "m2"], [["hello", "hey"]]))
    | prompt | m1 | m2 |
    | --- | --- | --- |
    | hi | hello | hey |
    """
    lines = [
        "| " + " | ".join(markdown_cell(cell) for cell in ["prompt", *labels]) + " |",
        "| " + " | ".join("---" for _ in range(len(labels) + 1)) + " |",
    ]
    for prompt, row in zip(prompts, answers, strict=True):
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in [prompt, *row]) + " |")
    return "\n".join(lines) + "\n"


def parse_adapter_spec(spec: str) -> ModelSpec:
    """``BASE_DIR:ADAPTER_DIR`` to ``(BASE_DIR, ADAPTER_DIR)``."""
    parts = spec.split(":")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--adapters expects BASE_DIR:ADAPTER_DIR (one colon), got {spec!r}")
    return parts[0], parts[1]


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per non-blank line of ``path``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"--prompts_file {path}: cannot read it: {error}") from error
    return [line.strip() for line in lines if line.strip()]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], metavar="DIR", help="full model dirs")
    parser.add_argument("--adapters", nargs="+", default=[], metavar="BASE_DIR:ADAPTER_DIR", help="LoRA adapters")
    parser.add_argument("--prompts", nargs="+", default=[], metavar="PROMPT", help="user messages to answer")
    parser.add_argument("--prompts_file", type=Path, help="more prompts, one per line")
    parser.add_argument("--system", help="system prompt before every user message (none by default)")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer")
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    send_logs_to_stderr()
    models: list[ModelSpec] = [(model_dir, None) for model_dir in args.models]
    models += [parse_adapter_spec(spec) for spec in args.adapters]
    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not models:
        raise ConfigError("nothing to compare: give --models and/or --adapters")
    if not prompts:
        raise ConfigError("no prompts: give --prompts and/or a non-empty --prompts_file")
    check_decoding(args.max_new_tokens, 0.0)
    answers = compare(models, prompts, args.max_new_tokens, system=args.system)
    table = markdown_table(prompts, [model_label(spec) for spec in models], answers)
    notes = [line for spec in models if (line := eval_loss_line(spec)) is not None]
    table += "".join(f"\n{line}" for line in notes) + ("\n" if notes else "")
    sys.stdout.write(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table, encoding="utf-8")
        logger.info("wrote the comparison to %s", args.output)


if __name__ == "__main__":
    sys.exit(run_cli(main))
