"""Tokenizer and causal-LM construction: from a config (scratch) or from pretrained weights.

Weights are only ever read from safetensors, and checkpoint-supplied code only runs when
``trust_remote_code`` is set.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmtrain.errors import ConfigError
from llmtrain.multimodal import is_multimodal, text_training_config

if TYPE_CHECKING:  # the tools load tokenizers and models without the training arguments' imports
    from llmtrain.config.arguments import ModelArguments

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Pickled weights as transformers and PEFT save them (``safe_serialization=False``).
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "adapter_model.bin", "*.pt", "*.pth")


def load_tokenizer(
    source: str | Path, trust_remote_code: bool = False, field_name: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory or hub id; one that cannot be loaded is a :class:`ConfigError`.

    ``field_name`` is the setting ``source`` came from, named in the error (tools give a plain path).
    """
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if field_name is None:
            raise ConfigError(f"cannot load a tokenizer from {source}: {error}") from error
        raise ConfigError(f"{field_name}: cannot load {_describe_source(str(source))}: {_first_line(error)}") from error


def load_tokenizer_for(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``tokenizer_name_or_path`` (set by ModelArguments' rules)."""
    assert model_args.tokenizer_name_or_path is not None
    return load_tokenizer(model_args.tokenizer_name_or_path, model_args.trust_remote_code, "tokenizer_name_or_path")


def pickle_only_weights(directory: Path) -> str | None:
    """The pickled weights file of a model or adapter dir that has no safetensors beside it, else None.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "adapter_model.bin").write_bytes(b"")
    >>> pickle_only_weights(d)
    'adapter_model.bin'
    >>> _ = (d / "adapter_model.safetensors").write_bytes(b""); pickle_only_weights(d) is None
    True
    """
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return None
    pickled = sorted(path.name for pattern in PICKLE_WEIGHT_PATTERNS for path in directory.glob(pattern))
    return pickled[0] if pickled else None


def check_safetensors_weights(source: str | Path, field_name: str | None = None) -> None:
    """Refuse a local model or adapter dir whose weights exist only as pickle, before anything else is done.

    Pickle can run code when it is loaded, so such weights are never read; without this check the
    refusal would come as a loader traceback after the data build. ``field_name`` is the setting
    ``source`` came from (tools pass None and name the path).
    """
    pickled = pickle_only_weights(Path(source).expanduser())
    if pickled is None:
        return
    where = f"{field_name}: {source}" if field_name else str(source)
    raise ConfigError(
        f"{where} holds its weights only as pickle ({pickled}), which can run code when loaded; only safetensors "
        "are read. Convert it once where you trust the file, e.g. from_pretrained(dir, use_safetensors=False)"
        ".save_pretrained(new_dir), which writes safetensors"
    )


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Read the architecture config only (no weights): from config_name or model_name_or_path.

    Pretrained weights that exist only as pickle are refused here, the first time the model is named.
    """
    source = model_args.config_name or model_args.model_name_or_path
    assert source is not None  # ModelArguments guarantees one of the two
    field_name = "config_name" if model_args.config_name else "model_name_or_path"
    if not model_args.from_scratch and model_args.model_name_or_path is not None:
        check_safetensors_weights(model_args.model_name_or_path, "model_name_or_path")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{field_name}: cannot load a model config from {_describe_source(source)}: {_first_line(error)}"
        ) from error


def _describe_source(source: str) -> str:
    """A path that does not exist is most often a missing earlier step, not a hub id."""
    if Path(source).exists():
        return source
    return f"{source} (no such local directory, and not loadable as a hub id)"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_sequence_length(length: int, config: PretrainedConfig, field_name: str) -> None:
    """Refuse sequences longer than the model's position range (RoPE beyond it is untrained)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError(f"{field_name}={length} exceeds the model's max_position_embeddings={limit}")


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is importable and a GPU is present, else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of ``parameter``, also when DeepSpeed ZeRO-3 has partitioned it (``numel()`` is then 0).

    >>> parameter_count(torch.nn.Parameter(torch.zeros(2, 3)))
    6
    """
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def build_model(
    model_args: ModelArguments, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 42
) -> PreTrainedModel:
    """Create the causal LM: fresh weights from ``config``, or pretrained weights.

    The RNGs are seeded with ``seed`` (the run's ``seed``) first: the Trainer seeds only when it
    is built, after the model, so without this two runs of one config start from different
    weights (and LoRA adapters), and no rerun could reproduce a run.

    From scratch, the config's special-token ids are set from the tokenizer so that
    ``generate`` stops at EOS. The KV cache is switched off for training: with it on,
    transformers skips the packed-sequence mask and samples would attend to each other. A
    multimodal config (the published Qwen3.5 layout) builds or loads its text model
    (:func:`llmtrain.multimodal.text_training_config`: the output layer tied as the published class ties it).
    """
    dtype = "auto" if model_args.dtype == "auto" else DTYPES[model_args.dtype]
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    transformers.set_seed(seed)
    if is_multimodal(config):
        logger.info(
            "%s is a multimodal %s: training its text model (%s); the vision tower is not loaded",
            model_args.config_name or model_args.model_name_or_path,
            ", ".join(config.architectures or [config.model_type]),
            config.get_text_config().model_type,
        )
        config = text_training_config(config)
    if model_args.from_scratch:
        if len(tokenizer) > config.vocab_size:
            raise ConfigError(
                f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but config_name's "
                f"vocab_size is {config.vocab_size}"
            )
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=torch.float32 if dtype == "auto" else dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
        )
    else:
        assert model_args.model_name_or_path is not None
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=True,
        )
        if len(tokenizer) > model.config.vocab_size:
            logger.warning("resizing token embeddings to the tokenizer's %d tokens", len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    n_params = sum(parameter_count(p) for p in model.parameters())
    logger.info(
        "model: %s, %.2fM parameters, dtype %s, attention %s, %s",
        type(model).__name__,
        n_params / 1e6,
        next(model.parameters()).dtype,
        attn_implementation,
        "from scratch" if model_args.from_scratch else f"from {model_args.model_name_or_path}",
    )
    return model


def stop_at_end_of_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn_token: str) -> None:
    """Make ``generate`` stop at the chat template's end of turn as well as at EOS.

    Set in the model's generation config, which every save writes to ``generation_config.json``:
    transformers' ``generate``, vLLM and TGI read their stop ids from it. A base model's config
    names only its EOS (``<|endoftext|>`` for Qwen base models), so a fine-tuned chat model would
    run on past ``<|im_end|>`` into a turn of its own.
    """
    end_of_turn = tokenizer.convert_tokens_to_ids(end_of_turn_token)
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        raise ConfigError(f"end_of_turn_token: {end_of_turn_token!r} is not a token of the tokenizer")
    stops = [end_of_turn]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != end_of_turn:
        stops.append(int(tokenizer.eos_token_id))
    generation = model.generation_config
    generation.eos_token_id = stops
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    logger.info("generation stops at %s", ", ".join(tokenizer.convert_ids_to_tokens(stops)))
