"""Token mixers of a model: which decoder layers are softmax attention and which carry state along the sequence.

Packing several conversations into one row is exact only when every token mixer can be told where
a conversation ends. Softmax attention can: position ids that restart at 0 give it a block-diagonal
mask (sdpa, eager) or variable-length boundaries (flash-attention). A recurrent mixer cannot from
position ids alone. Qwen3.5's Gated DeltaNet layers (``linear_attention``) carry a recurrent state
and a causal conv1d window from one token to the next; they restart only at ``cu_seq_lens_q`` (the
state, through flash-linear-attention's kernel) and ``seq_idx`` (the conv, through causal-conv1d's
kernel). Without those kernels transformers runs reference PyTorch code that takes neither, so a
packed row would let each conversation start from the previous one's state.

Decided from the model itself, never from a list of model names: the config's per-layer
``layer_types`` (any type other than softmax attention is a recurrent mixer), and the built modules
(a mixer whose ``forward`` takes ``cache_params`` keeps a recurrent state, as Mamba, Gated DeltaNet
and short-conv layers in transformers do).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections import Counter

import torch
from torch import nn
from transformers import PretrainedConfig

# Layer types whose mixer is softmax attention (transformers' names; Qwen3 / Gemma use the sliding one).
SOFTMAX_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
# What exact packing of recurrent mixers needs on a GPU: package (pip name) -> its import name.
VARLEN_KERNELS = {
    "flash-attn": "flash_attn",
    "flash-linear-attention": "fla",
    "causal-conv1d": "causal_conv1d",
}


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: ``text_config`` of a multimodal config, else ``config`` itself."""
    return config.get_text_config()


def layer_types(config: PretrainedConfig) -> list[str]:
    """Each decoder layer's mixer type: the config's ``layer_types``, else softmax attention throughout.

    >>> from transformers import Qwen2Config, Qwen3_5TextConfig
    >>> layer_types(Qwen2Config(num_hidden_layers=2, use_sliding_window=False))
    ['full_attention', 'full_attention']
    >>> layer_types(Qwen3_5TextConfig(num_hidden_layers=4))
    ['linear_attention', 'linear_attention', 'linear_attention', 'full_attention']
    """
    decoder = text_config(config)
    declared = getattr(decoder, "layer_types", None)
    return list(declared) if declared else ["full_attention"] * int(decoder.num_hidden_layers)


def recurrent_layer_counts(config: PretrainedConfig) -> dict[str, int]:
    """Layers whose mixer is not softmax attention, counted by type ({} for a pure-attention model).

    >>> from transformers import Qwen3Config, Qwen3_5TextConfig
    >>> recurrent_layer_counts(Qwen3_5TextConfig(num_hidden_layers=8)), recurrent_layer_counts(Qwen3Config())
    ({'linear_attention': 6}, {})
    """
    return dict(Counter(kind for kind in layer_types(config) if kind not in SOFTMAX_LAYER_TYPES))


def describe_recurrent_layers(counts: dict[str, int], total: int) -> str:
    """``{'linear_attention': 6}, 8`` -> ``'6 of 8 layers are linear_attention'``."""
    return ", ".join(f"{count} of {total} layers are {kind}" for kind, count in counts.items())


def recurrent_mixers(model: nn.Module) -> list[str]:
    """Names of the modules that keep a recurrent state along the sequence (their ``forward`` takes ``cache_params``).

    >>> class Mixer(nn.Module):
    ...     def forward(self, hidden_states, cache_params=None): return hidden_states
    >>> recurrent_mixers(nn.ModuleDict({"attn": nn.Linear(2, 2), "mixer": Mixer()}))
    ['mixer']
    """
    found = []
    for name, module in model.named_modules():
        try:
            parameters = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):  # a builtin forward without a signature
            continue
        if "cache_params" in parameters:
            found.append(name)
    return found


def missing_varlen_kernels() -> list[str]:
    """What this machine lacks to pack recurrent mixers exactly: a CUDA GPU, the kernels of :data:`VARLEN_KERNELS`."""
    missing = [] if torch.cuda.is_available() else ["a CUDA GPU"]
    return missing + [package for package, module in VARLEN_KERNELS.items() if importlib.util.find_spec(module) is None]
