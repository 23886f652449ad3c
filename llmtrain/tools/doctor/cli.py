"""Preflight checks for a training launch: one line per check, exit 2 when any check fails.

    python -m llmtrain.tools.doctor pretrain [config.yaml] [--key value ...] [--fast]
    python -m llmtrain.tools.doctor sft [config.yaml] [--key value ...] [--fast]

The stage is ``pretrain`` or ``sft`` (``finetune`` is accepted for ``sft``, so a launcher can pass
its entry file's name). The config file and overrides are exactly those of ``pretrain.py`` /
``finetune.py``, with the same default config. Checks, each reported as ``ok``, ``WARNING`` or
``ERROR`` on a greppable line (``doctor: ERROR   data: /d/x.jsonl:3: invalid JSON ...``):

* ``library <name>``: importable (``--fast``: installed), version against ``requirements.txt``'s pin;
* ``config``: the config and overrides parse (unknown keys, cross-field rules);
* ``gpus``: GPUs torch sees against what the launcher will use (``NUM_GPUS``,
  ``CUDA_VISIBLE_DEVICES``, ``NPROC``), bf16 on CPU;
* ``model``: the model config loads; parameters counted on the meta device (no weights read,
  nothing allocated), with the fine-tuning method applied for SFT;
* ``sequence length``: ``block_size`` / ``max_seq_length`` within the model's positions;
* ``tokenizer``: loads; EOS for pretraining; chat template and a single-token end of turn for SFT;
* ``data``: every train/validation file resolves, is readable and its first record parses; without
  ``--fast`` one sample is also encoded (token and supervised-token counts);
* ``output_dir`` (and the dataset cache): a probe file can be created and deleted there (or in its
  nearest existing parent; nothing is created or left behind), and no live launch holds its lock;
* ``disk``: free space at ``output_dir`` against an estimate of the checkpoints the run keeps.

``--fast`` (what the launchers run before every start) reads no weights, makes no network request
and reads only the first record of each data file. Measured on 2 CPU cores: ~8 s of imports, then
0.1 s for the tiny default and ~2 s for a Qwen2.5-1.5B LoRA config (peft wraps the meta model).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmtrain.errors import ConfigError, UserInputError
from llmtrain.stages import STAGES, find_stage
from llmtrain.tools.doctor.diagnosis import diagnose
from llmtrain.tools.doctor.report import ERROR, PreflightError, write_report

FAST_FLAG = "--fast"


def split_cli(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """``STAGE [config.yaml] [--key value ...] [--fast]`` -> (stage name, fast, entry-file arguments).

    >>> split_cli(["finetune", "--fast", "configs/x.yaml", "--lora_r", "4"])
    ('sft', True, ['configs/x.yaml', '--lora_r', '4'])
    """
    got = repr(argv[0]) if argv else "nothing"
    try:
        stage = find_stage(argv[0]) if argv else None
    except ConfigError:
        stage = None
    if stage is None:
        raise UserInputError(f"doctor: the first argument must be {' or '.join(STAGES)} (or finetune), got {got}")
    rest = list(argv[1:])
    fast = FAST_FLAG in rest
    return stage.name, fast, [arg for arg in rest if arg != FAST_FLAG]


def main(argv: list[str]) -> None:
    """Print the report; raise :class:`PreflightError` (exit 2 under ``run_cli``) when a check failed."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")  # this module's docstring is the usage text
        if not argv:
            raise UserInputError(f"doctor: say which stage to check: {' or '.join(STAGES)}")
        return
    stage_name, fast, rest = split_cli(argv)
    findings = diagnose(stage_name, rest, fast)
    write_report(findings, sys.stdout, fast)
    errors = [finding for finding in findings if finding.status == ERROR]
    if errors:
        raise PreflightError(f"doctor: {len(errors)} check(s) failed ({', '.join(sorted({e.check for e in errors}))})")
