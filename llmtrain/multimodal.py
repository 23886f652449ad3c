"""Multimodal checkpoints trained as their text model: the published layout in, the published layout out.

Qwen3.5 (and later models on transformers' ``qwen3_5`` architecture) is published as
``Qwen3_5ForConditionalGeneration``: a composite config (``text_config`` + ``vision_config``), the
text model's weights under ``model.language_model.*``, a vision tower under ``model.visual.*``, and
sometimes ``mtp.*`` (multi-token prediction) weights that transformers does not load. Text SFT and
continued pretraining train the text model only (``Qwen3_5ForCausalLM``, what ``AutoModelForCausalLM``
loads from such a checkpoint), so the vision tower costs no GPU memory and gets no update. The
final model is then written back in the base's published layout (:meth:`MultimodalBase.publish`):

* the base's ``config.json`` (its ``architectures``, ``vision_config``, everything), with the
  ``text_config`` fields training changed (a resized vocabulary) and the embedding tie stated in
  ``text_config`` as well as at the top level, so ``AutoModelForCausalLM`` ties like the published class;
* the trained text weights, plus every other tensor of the base (vision tower, ``mtp.*``) copied
  bit for bit from the base's files;
* the base's processor files (image and video preprocessing), where the output has none.

A LoRA adapter names its modules as the published class does (``model.language_model.layers.N``),
so PEFT, vLLM and transformers' ``load_adapter`` apply it to the published checkpoint; PEFT on the
text class needs :meth:`MultimodalBase.adapter_key_mapping`. Checkpoints keep the text model's
layout (resume loads them into the text model).

The tie: the published class ties its output layer to the embedding as the *top-level*
``tie_word_embeddings`` says, while the text class reads ``text_config``'s, which a published config
may leave out (transformers' default is then false, and the output layer would be initialised at
random). :func:`text_training_config` takes the published class's rule.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from llmtrain.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
OUTPUT_LAYER_KEY = "lm_head.weight"
ADAPTER_PREFIX = "base_model.model."  # PEFT's prefix of every saved adapter key
# The base's image/video processing, which a published multimodal checkpoint ships for serving.
PROCESSOR_FILE_PATTERNS = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
# Config keys that say how a file was written, not what the model is: never copied into the base's text_config.
WRITER_KEYS = frozenset({"architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"})


def is_multimodal(config: PretrainedConfig) -> bool:
    """True for a composite config whose decoder is a ``text_config`` (the published Qwen3.5 layout).

    >>> from transformers import Qwen3_5Config, Qwen3_5TextConfig
    >>> is_multimodal(Qwen3_5Config()), is_multimodal(Qwen3_5TextConfig())
    (True, False)
    """
    return config.get_text_config() is not config


def text_training_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config the text model is built or loaded with; ``config`` itself unless it is multimodal.

    The embedding tie is the published class's (the top-level ``tie_word_embeddings``), whatever
    ``text_config`` declares.

    >>> from transformers import Qwen3_5Config
    >>> text_training_config(Qwen3_5Config(tie_word_embeddings=True)).tie_word_embeddings
    True
    """
    if not is_multimodal(config):
        return config
    text = config.get_text_config()
    text.tie_word_embeddings = bool(config.tie_word_embeddings)
    return text


def checkpoint_tensor_names(directory: Path) -> dict[str, str]:
    """Every tensor name of a safetensors checkpoint in ``directory`` -> the file (name) that holds it."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise ConfigError(f"{directory} has neither {SINGLE_WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    with safe_open(str(single), framework="pt") as weights:
        return dict.fromkeys(weights.keys(), SINGLE_WEIGHTS_FILE)


def local_model_dir(name_or_path: str) -> Path:
    """A local dir holding the files of ``name_or_path``: the dir itself, or its hub-cache snapshot."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))


@dataclass(frozen=True)
class MultimodalBase:
    """A published multimodal checkpoint whose text model is trained (see the module docstring)."""

    directory: Path
    tensor_files: dict[str, str]  # every tensor of the base -> its file in ``directory``
    text_prefix: str  # where the text model's weights are, e.g. "model.language_model."

    @classmethod
    def find(cls, model_name_or_path: str | None, config: PretrainedConfig) -> MultimodalBase | None:
        """The base behind ``model_name_or_path`` when ``config`` is multimodal, else None (from scratch too)."""
        if model_name_or_path is None or not is_multimodal(config):
            return None
        directory = local_model_dir(model_name_or_path)
        tensor_files = checkpoint_tensor_names(directory)
        # The text model is the module that owns an input embedding and the most weights (an mtp head may
        # carry an embedding of its own).
        prefixes = [
            name.removesuffix("embed_tokens.weight") for name in tensor_files if name.endswith("embed_tokens.weight")
        ]
        if not prefixes:
            raise ConfigError(
                f"model_name_or_path: {directory} holds no input embedding (embed_tokens), so the text model's "
                "weights cannot be told apart and a fine-tune could not be saved in its layout"
            )
        text_prefix = max(prefixes, key=lambda prefix: sum(name.startswith(prefix) for name in tensor_files))
        return cls(directory, tensor_files, text_prefix)

    def text_prefixes(self, model: Any) -> tuple[str, str]:
        """``(prefix in the live text model, prefix in the published one)``: ``("model.", "model.language_model.")``."""
        embedding = model.get_input_embeddings()
        live = next(name for name, module in model.named_modules() if module is embedding)
        return live.removesuffix("embed_tokens") if live.endswith("embed_tokens") else f"{live}.", self.text_prefix

    def adapter_key_mapping(self, model: Any) -> dict[str, str]:
        """PEFT's ``key_mapping`` that loads a published-layout adapter onto the text class ``model``."""
        live, published = self.text_prefixes(model)
        return {f"^{re.escape(published)}": live}

    def publish(self, directory: Path, model: Any) -> None:
        """Turn the final save of the text ``model`` in ``directory`` into the base's published layout.

        A full model gets the base's config and every base tensor the text model does not hold;
        an adapter's keys are renamed to the published modules. Nothing in ``directory`` is
        replaced before every new file is written beside it.
        """
        if (directory / ADAPTER_WEIGHTS_FILE).is_file():
            self._publish_adapter(directory, model)
        else:
            self._publish_model(directory, model)
        for pattern in PROCESSOR_FILE_PATTERNS:
            source = self.directory / pattern
            if source.is_file() and not (directory / pattern).exists():
                shutil.copy2(source, directory / pattern)
        logger.info("saved in the published layout of %s (%s)", self.directory, self.architectures())

    def architectures(self) -> str:
        return ", ".join(json.loads((self.directory / CONFIG_FILE).read_text()).get("architectures") or ["?"])

    def _publish_adapter(self, directory: Path, model: Any) -> None:
        live, published = self.text_prefixes(_unwrapped(model))
        path = directory / ADAPTER_WEIGHTS_FILE
        renamed = {}
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata()
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = key.removeprefix(ADAPTER_PREFIX)
                if name.startswith(live) and not name.startswith(published):
                    name = published + name.removeprefix(live)
                renamed[ADAPTER_PREFIX + name] = weights.get_tensor(key)
        staged = directory / f".{ADAPTER_WEIGHTS_FILE}.tmp"
        save_file(renamed, str(staged), metadata=metadata)
        os.replace(staged, path)

    def _publish_model(self, directory: Path, model: Any) -> None:
        saved = checkpoint_tensor_names(directory)
        misplaced = sorted(name for name in saved if name != OUTPUT_LAYER_KEY and name not in self.tensor_files)
        if misplaced:
            raise ConfigError(
                f"the fine-tuned text model's tensors {', '.join(misplaced[:3])} have no place in the layout of "
                f"{self.directory}; the model was saved in the text model's layout to {directory}"
            )
        expected = {name for name in self.tensor_files if name.startswith(self.text_prefix)}
        if OUTPUT_LAYER_KEY in self.tensor_files and not _unwrapped(model).config.tie_word_embeddings:
            expected.add(OUTPUT_LAYER_KEY)
        lost = sorted(expected - set(saved))
        if lost:
            raise ConfigError(f"the fine-tuned model lacks {', '.join(lost[:3])} of {self.directory}")
        carried = {name: file for name, file in self.tensor_files.items() if self._outside_text_model(name)}
        weight_map = self._write_carried_tensors(directory, saved, carried)
        self._write_config(directory, _unwrapped(model).config)
        total_size = sum((directory / file).stat().st_size for file in set(weight_map.values()))
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _outside_text_model(self, name: str) -> bool:
        return not name.startswith(self.text_prefix) and name != OUTPUT_LAYER_KEY

    def _write_carried_tensors(self, directory: Path, saved: dict[str, str], carried: dict[str, str]) -> dict[str, str]:
        """Write the base's tensors outside the text model as one more shard; rename the shards to match."""
        text_files = sorted(set(saved.values()))
        count = len(text_files) + (1 if carried else 0)
        shard = [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
        if carried:
            tensors: dict[str, Any] = {}
            by_file: dict[str, list[str]] = defaultdict(list)
            for name, file in carried.items():
                by_file[file].append(name)
            for file, names in by_file.items():
                with safe_open(str(self.directory / file), framework="pt") as weights:
                    tensors.update({name: weights.get_tensor(name) for name in names})
            save_file(tensors, str(directory / shard[-1]), metadata={"format": "pt"})
        renamed = dict(zip(text_files, shard, strict=False))
        for old, new in renamed.items():
            os.replace(directory / old, directory / new)
        (directory / SINGLE_WEIGHTS_FILE).unlink(missing_ok=True)
        return {**{name: renamed[file] for name, file in saved.items()}, **dict.fromkeys(carried, shard[-1])}

    def _write_config(self, directory: Path, trained: PretrainedConfig) -> None:
        """The base's config.json with the text_config fields training changed, and the tie stated at both levels."""
        published = json.loads((self.directory / CONFIG_FILE).read_text())
        base_text = type(trained).from_dict(published.get("text_config") or {}).to_dict()  # as the base declares it
        text = dict(published.get("text_config") or {})
        for key, value in trained.to_dict().items():
            if key not in WRITER_KEYS and base_text.get(key) != value:
                text[key] = value
        text["tie_word_embeddings"] = bool(published.get("tie_word_embeddings", False))
        published["text_config"] = text
        staged = directory / f".{CONFIG_FILE}.tmp"
        staged.write_text(json.dumps(published, indent=2) + "\n")
        os.replace(staged, directory / CONFIG_FILE)


def _unwrapped(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model
