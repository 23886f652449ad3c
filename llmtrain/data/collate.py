"""SFT batches: which sequence layout a run trains on, and the collators that build it.

Light on purpose (torch only, no ``datasets``), so benchmarks and tools can build the same batches.

The layout follows from ``packing``, ``share_prefixes``, the attention implementation and the
model's token mixers (:mod:`llmtrain.mixers`), never from a model name:

======================  =====================================================================
``padded``              one conversation per row, right-padded, with an attention mask
``packed_rows``         packed rows kept as rows; position ids restart per conversation, and
                        transformers builds one block-diagonal causal mask per row (sdpa, eager)
``packed_flat``         packed rows flattened into one ``[1, total]`` sequence: flash-attention's
                        variable-length kernel reads the boundaries from the position ids
``packed_flat_varlen``  as ``packed_flat``, plus the boundaries every recurrent mixer needs:
                        ``cu_seq_lens_q/k`` (flash-attention, Gated DeltaNet's state) and
                        ``seq_idx`` (the causal conv1d window)
``tree_rows``           as ``padded``, but a conversation whose rows share prefixes (a template
                        that rewrites history) is one prefix tree (:mod:`llmtrain.data.prefix_tree`)
                        with its ancestor mask (sdpa, eager)
``packed_trees``        as ``packed_rows``, with such trees among the packed conversations
======================  =====================================================================

A model with recurrent mixers is packed only as ``packed_flat_varlen``, which needs a CUDA GPU
with flash-attn, flash-linear-attention and causal-conv1d; anywhere else it trains ``padded``
rows, exact because right padding never reaches an earlier token of a causal mixer. Prefix trees
need a mask that flash-attention cannot take, and a recurrent mixer cannot branch: there the
rows stay rows.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from llmtrain.data.prefix_tree import ancestor_mask, tree_shift_labels
from llmtrain.errors import ConfigError, DataError
from llmtrain.loss import IGNORE_INDEX
from llmtrain.metrics import PADDED_POSITIONS
from llmtrain.mixers import describe_recurrent_layers, layer_types, missing_varlen_kernels, recurrent_layer_counts

logger = logging.getLogger(__name__)

PADDED, PACKED_ROWS, PACKED_FLAT, PACKED_FLAT_VARLEN = "padded", "packed_rows", "packed_flat", "packed_flat_varlen"
TREE_ROWS, PACKED_TREES = "tree_rows", "packed_trees"
PACKED_LAYOUTS = (PACKED_ROWS, PACKED_FLAT, PACKED_FLAT_VARLEN, PACKED_TREES)
TREE_LAYOUTS = {TREE_ROWS: PADDED, PACKED_TREES: PACKED_ROWS}  # each with what it is without trees
SEQUENCE_LAYOUT_KEY = "sequence_layout"  # in the prepared data's metadata, so in the run manifest's "data"


@dataclass(frozen=True)
class SequenceLayout:
    """How conversations are laid out in a micro-batch (module docstring); what the prepared rows must be."""

    name: str
    reason: str
    fallback: bool = False  # packing was asked for but cannot be exact here
    attn_implementation: str = "sdpa"

    @property
    def packed(self) -> bool:
        """Whether the prepared rows are packed."""
        return self.name in PACKED_LAYOUTS

    @property
    def trees(self) -> bool:
        """Whether a conversation's rows that share prefixes are prepared as one prefix tree."""
        return self.name in TREE_LAYOUTS

    def settled(self, trees: int) -> SequenceLayout:
        """This layout for prepared data holding ``trees`` prefix trees: without trees where there are none."""
        if not self.trees or trees:
            return self
        reason = f"{self.reason}; no conversation's rows share a prefix"
        return dataclasses.replace(self, name=TREE_LAYOUTS[self.name], reason=reason)

    def announce(self) -> None:
        """One log line: a warning when packing was asked for and cannot be exact here, else info."""
        if self.fallback:
            logger.warning(
                "packing: %s. per_device_train_batch_size now counts conversations, not packed rows of "
                "max_seq_length tokens: raise it or gradient_accumulation_steps to keep the tokens per step",
                self.reason,
            )
        else:
            logger.info("sequence layout: %s (%s)", self.name, self.reason)


def choose_layout(
    packing: bool,
    attn_implementation: str,
    config: PretrainedConfig,
    missing_kernels: list[str] | None = None,
    share_prefixes: str = "false",
) -> SequenceLayout:
    """The layout for ``packing`` and ``share_prefixes`` under ``attn_implementation`` (resolved) and ``config``.

    ``missing_kernels`` is what :func:`llmtrain.mixers.missing_varlen_kernels` reports (looked up
    when None); it matters only for a model with recurrent mixers, which is never packed without them.
    ``share_prefixes`` (auto, true, false): prefix trees where they are exact; ``true`` where they are
    not is a :class:`ConfigError`.

    >>> from transformers import Qwen2Config, Qwen3_5TextConfig
    >>> choose_layout(True, "sdpa", Qwen2Config()).name, choose_layout(True, "flash_attention_2", Qwen2Config()).name
    ('packed_rows', 'packed_flat')
    >>> choose_layout(True, "sdpa", Qwen2Config(), share_prefixes="auto").name
    'packed_trees'
    >>> choose_layout(False, "eager", Qwen2Config(), share_prefixes="auto").name
    'tree_rows'
    >>> hybrid = Qwen3_5TextConfig(num_hidden_layers=4)
    >>> choose_layout(True, "sdpa", hybrid, missing_kernels=["a CUDA GPU"], share_prefixes="auto").name
    'padded'
    >>> choose_layout(True, "flash_attention_2", hybrid, missing_kernels=[]).name
    'packed_flat_varlen'
    """
    layout = _packing_layout(packing, attn_implementation, config, missing_kernels)
    recurrent = recurrent_layer_counts(config)
    if recurrent:
        problem = f"{describe_recurrent_layers(recurrent, len(layer_types(config)))}: a recurrent mixer cannot branch"
    elif attn_implementation.startswith("flash"):
        problem = f"{attn_implementation} cannot take a prefix tree's ancestor mask"
    else:
        problem = ""
    if share_prefixes == "true" and problem:
        raise ConfigError(f"share_prefixes: true, but {problem}; set share_prefixes: auto (rows where it is not exact)")
    if share_prefixes == "false":
        return layout
    if problem:
        return dataclasses.replace(layout, reason=f"{layout.reason}; rows that share a prefix stay rows: {problem}")
    name = PACKED_TREES if layout.packed else TREE_ROWS
    reason = f"{layout.reason}; a conversation's rows that share a prefix train as one prefix tree"
    return dataclasses.replace(layout, name=name, reason=reason)


def _packing_layout(
    packing: bool, attn_implementation: str, config: PretrainedConfig, missing_kernels: list[str] | None
) -> SequenceLayout:
    """The layout for ``packing`` alone (see :func:`choose_layout`)."""
    attn = attn_implementation
    if not packing:
        return SequenceLayout(PADDED, "packing is off", attn_implementation=attn)
    recurrent = recurrent_layer_counts(config)
    flash = attn.startswith("flash")
    if not recurrent:
        if flash:
            return SequenceLayout(PACKED_FLAT, f"{attn} reads the boundaries from the position ids", False, attn)
        return SequenceLayout(PACKED_ROWS, f"{attn}: one block-diagonal mask per packed row", False, attn)
    layers = describe_recurrent_layers(recurrent, len(layer_types(config)))
    missing = missing_varlen_kernels() if missing_kernels is None else missing_kernels
    if not flash and "flash-attn" not in missing:
        missing = [*missing, f"attn_implementation flash_attention_2 (not {attn})"]
    if not missing:
        return SequenceLayout(PACKED_FLAT_VARLEN, f"{layers}: each boundary is passed to every mixer", False, attn)
    return SequenceLayout(
        PADDED,
        f"{layers}, whose state and conv window would run from one packed conversation into the next; packing them "
        f"exactly needs {', '.join(missing)} (pip install -r requirements-gpu.txt on a CUDA machine), so each "
        "conversation trains in a row of its own (dynamic padding)",
        True,
        attn,
    )


def check_layout_fits_model(layout: SequenceLayout, recurrent_modules: list[str]) -> None:
    """Refuse a packed layout without boundaries for mixers the config did not declare (found in the built model).

    >>> check_layout_fits_model(SequenceLayout(PACKED_ROWS, ""), ["model.layers.0.mixer"])
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: packing: the model has recurrent token mixers (model.layers.0.mixer) that its \
config's layer_types do not declare; packed conversations would leak into each other through them: set packing: false
    """
    if layout.name not in (PADDED, PACKED_FLAT_VARLEN) and recurrent_modules:
        shown = ", ".join(recurrent_modules[:3]) + (", ..." if len(recurrent_modules) > 3 else "")
        raise ConfigError(
            f"packing: the model has recurrent token mixers ({shown}) that its config's layer_types do not declare; "
            "packed conversations would leak into each other through them: set packing: false"
        )


def collator_for(layout: SequenceLayout, pad_token_id: int) -> Any:
    """The collator that builds ``layout``'s micro-batches.

    >>> [type(collator_for(SequenceLayout(name, ""), 0)).__name__
    ...  for name in (PADDED, PACKED_ROWS, PACKED_FLAT_VARLEN, PACKED_TREES)]
    ['PaddingCollator', 'PackedRowsCollator', 'FlatPackedCollator', 'TreeRowsCollator']
    """
    if layout.trees:
        return TreeRowsCollator(pad_token_id, additive=layout.attn_implementation == "eager")
    if layout.name == PADDED:
        return PaddingCollator(pad_token_id)
    if layout.name == PACKED_ROWS:
        return PackedRowsCollator(pad_token_id)
    return FlatPackedCollator(boundaries=layout.name == PACKED_FLAT_VARLEN)


def pad_right(features: list[dict[str, Any]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``input_ids`` (padded with ``pad_token_id``) and ``labels`` (with -100) as ``[rows, longest]``; the lengths.

    >>> rows = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}]
    >>> ids, labels, lengths = pad_right(rows, 0)
    >>> ids.tolist(), labels.tolist(), lengths
    ([[5, 6], [7, 0]], [[-100, 6], [7, -100]], [2, 1])
    """
    lengths = [len(feature["input_ids"]) for feature in features]
    input_ids = torch.full((len(features), max(lengths)), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), max(lengths)), IGNORE_INDEX, dtype=torch.long)
    for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
        input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
        labels[row, :length] = torch.as_tensor(feature["labels"])
    return input_ids, labels, lengths


@dataclass
class PaddingCollator:
    """Dynamic padding to the longest conversation in the batch (right side, labels -100)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, lengths = pad_right(features, self.pad_token_id)
        attention_mask = (torch.arange(input_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackedRowsCollator:
    """Packed rows kept as rows, padded to the longest: one block-diagonal mask per row (sdpa, eager).

    transformers derives each row's block-diagonal causal mask from its restarting position ids,
    so mask memory is rows x L², not (rows x L)² as for a flattened batch. Padding positions get
    labels -100 and position ids of their own (0, 1, ...), so they form one more block that no
    real token attends to; their count goes in :data:`~llmtrain.metrics.PADDED_POSITIONS` (there
    is no 2-D attention mask: one would switch off the packed-sequence mask).

    >>> rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
    ...         {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1]}]
    >>> batch = PackedRowsCollator(pad_token_id=0)(rows)
    >>> batch["input_ids"].tolist(), batch["position_ids"].tolist(), int(batch[PADDED_POSITIONS])
    ([[5, 6, 7], [8, 9, 0]], [[0, 1, 0], [0, 1, 0]], 1)
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, lengths = pad_right(features, self.pad_token_id)
        longest = input_ids.shape[1]
        position_ids = torch.zeros_like(input_ids)
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            position_ids[row, :length] = torch.as_tensor(feature["position_ids"])
            position_ids[row, length:] = torch.arange(longest - length)
        padded = input_ids.numel() - sum(lengths)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                PADDED_POSITIONS: torch.tensor(padded)}  # fmt: skip


@dataclass
class FlatPackedCollator:
    """Packed rows flattened into one padding-free ``[1, total]`` sequence: the variable-length kernels' layout.

    No attention mask: flash-attention reads the conversations' boundaries from the position ids
    that restart at 0. Under sdpa or eager transformers would build one ``[total, total]`` mask
    from them (quadratic in the whole micro-batch): :class:`PackedRowsCollator` keeps the rows
    instead. With ``boundaries`` the batch also names them for mixers that cannot read position
    ids, in the names and dtypes of transformers' ``DataCollatorWithFlattening``:
    ``cu_seq_lens_q/k`` (int32 cumulative lengths; Gated DeltaNet's state restarts there),
    ``max_length_q/k`` and ``seq_idx`` (int32, the conversation of each token; causal-conv1d's
    window restarts there). The model must run with ``use_cache=False``.

    Three conversations of 3, 2 and 2 tokens packed into two rows::

        position_ids  0 1 2 0 1 | 0 1
        seq_idx       0 0 0 1 1 | 2 2
        cu_seq_lens   0     3   5   7

    >>> rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
    ...         {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]}]
    >>> batch = FlatPackedCollator(boundaries=True)(rows)
    >>> batch["seq_idx"].tolist(), batch["cu_seq_lens_q"].tolist(), batch["max_length_q"]
    ([[0, 0, 0, 1, 1, 2, 2]], [0, 3, 5, 7], 3)
    >>> sorted(FlatPackedCollator()(rows))
    ['input_ids', 'labels', 'position_ids']
    """

    boundaries: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        flat = {key: [v for f in features for v in f[key]] for key in ("input_ids", "labels", "position_ids")}
        batch: dict[str, Any] = {key: torch.tensor([values], dtype=torch.long) for key, values in flat.items()}
        if self.boundaries:
            positions = batch["position_ids"][0]
            starts = torch.nonzero(positions == 0).flatten()
            cu_seq_lens = torch.cat([starts, torch.tensor([positions.numel()])]).to(torch.int32)
            longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
            batch["max_length_q"] = batch["max_length_k"] = longest
            batch["seq_idx"] = (torch.cumsum((positions == 0).to(torch.int32), 0) - 1).to(torch.int32)[None]
        return batch


@dataclass
class TreeRowsCollator:
    """Rows of prefix trees (:mod:`llmtrain.data.prefix_tree`) padded to the longest, each with its ancestor mask.

    ``position_ids`` are the trees' depths (a row without them is a chain: 0, 1, 2, ...); padding forms
    one more chain that no real token sees.
    The batch carries a 4-D ``attention_mask`` ``[rows, 1, L, L]`` (boolean for sdpa; with
    ``additive``, 0 / the dtype's minimum, as eager attention adds it), which transformers uses as
    it is, and ``shift_labels``: what each position predicts (its supervised child's token), since
    after a branch the next flattened token belongs to another row. Mask memory is rows x L².

    >>> tree = {"input_ids": [1, 2, 3, 5], "labels": [-100, -100, 3, -100], "position_ids": [0, 1, 2, 2]}
    >>> chain = {"input_ids": [7, 8], "labels": [-100, 8], "position_ids": [0, 1]}
    >>> batch = TreeRowsCollator(pad_token_id=0)([tree, chain])
    >>> batch["shift_labels"].tolist(), batch["attention_mask"][1, 0].int().tolist()
    ([[-100, 3, -100, -100], [8, -100, -100, -100]], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    """

    pad_token_id: int
    additive: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chains = [f if "position_ids" in f else {**f, "position_ids": range(len(f["input_ids"]))} for f in features]
        batch = PackedRowsCollator(self.pad_token_id)(chains)
        masks, shifted = [], []
        for labels, depths in zip(batch["labels"], batch["position_ids"], strict=True):
            masks.append(ancestor_mask(depths))
            shifted.append(tree_shift_labels(labels, depths))
        mask = torch.stack(masks)[:, None]
        if self.additive:
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        return {**batch, "attention_mask": mask, "shift_labels": torch.stack(shifted)}


def check_collated_batch(batch: dict[str, torch.Tensor]) -> None:
    """Refuse a collated batch in which padding, or a sample's first token, carries a label."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2 and (labels[mask == 0] != IGNORE_INDEX).any():
        raise DataError("a padding position carries a label; refusing to train")
    if "position_ids" in batch and (labels[batch["position_ids"] == 0] != IGNORE_INDEX).any():
        raise DataError("a packed sample's first token carries a label (it would be predicted across samples)")
