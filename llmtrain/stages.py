"""The two training stages, defined once: entry file, launcher, argument dataclasses, default config, length field.

Read by the entry files (``pretrain.py``, ``finetune.py``), the preflight (``llmtrain.tools.doctor``),
``llmtrain.tools.verify_resume`` and the launcher (``llmtrain.launch``). Importing this module
costs nothing (pathlib only): :meth:`Stage.dataclass_types` imports the argument dataclasses, and with
them transformers, only when called, so the launcher can look up a stage's default config fast.

>>> find_stage("finetune").name, find_stage("finetune.py").default_config.name
('sft', 'sft_tiny_full.yaml')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError
from llmtrain.paths import CONFIGS_DIR, PROJECT_ROOT


@dataclass(frozen=True)
class Stage:
    """One stage: what its entry file parses and which length must fit the model's positions."""

    name: str  # what the doctor and verify_resume are given: "pretrain" or "sft"
    entry_file: str  # at the project root
    launcher: str  # the bash wrapper users run, at the project root (it execs python -m llmtrain.launch)
    default_config: Path  # used when no YAML is given
    length_field: str  # the data field that sets the training sequence length
    argument_names: tuple[str, ...]  # dataclasses of llmtrain.config.arguments, in parse order

    def dataclass_types(self) -> tuple[type, ...]:
        """The argument dataclasses, in the order :func:`llmtrain.config.parser.parse_args` returns them."""
        from llmtrain.config import arguments  # here, not at import: the launcher reads stages without transformers

        return tuple(getattr(arguments, name) for name in self.argument_names)

    def sequence_length(self, data_args: Any) -> int:
        """Tokens per training row: ``block_size`` for pretraining, ``max_seq_length`` for SFT."""
        return int(getattr(data_args, self.length_field))

    @property
    def entry_path(self) -> Path:
        return PROJECT_ROOT / self.entry_file

    @property
    def launcher_path(self) -> Path:
        return PROJECT_ROOT / self.launcher


PRETRAIN = Stage(
    name="pretrain",
    entry_file="pretrain.py",
    launcher="pretrain.sh",
    default_config=CONFIGS_DIR / "pretrain_tiny.yaml",
    length_field="block_size",
    argument_names=("ModelArguments", "PretrainDataArguments", "TrainArguments"),
)
SFT = Stage(
    name="sft",
    entry_file="finetune.py",
    launcher="finetune.sh",
    default_config=CONFIGS_DIR / "sft_tiny_full.yaml",
    length_field="max_seq_length",
    argument_names=("ModelArguments", "SFTDataArguments", "FinetuneArguments", "TrainArguments"),
)
STAGES = {stage.name: stage for stage in (PRETRAIN, SFT)}


def find_stage(name: str) -> Stage:
    """The stage called ``name``, or whose entry file (``finetune``, ``pretrain.py``) or launcher it is."""
    for stage in STAGES.values():
        if name in (stage.name, stage.entry_file, stage.entry_file.removesuffix(".py"), stage.launcher):
            return stage
    raise ConfigError(f"unknown stage {name!r}: use {' or '.join(STAGES)}")
