"""Look inside a prepared pretraining dataset: counts per split, and any block or document decoded.

    python -m llmtrain.tools.inspect_data /shared/tok/corpus                      # counts per split
    python -m llmtrain.tools.inspect_data /shared/tok/corpus --block 0 --block_size 2048
    python -m llmtrain.tools.inspect_data /shared/tok/corpus --split validation --document 3

``PATH`` is a prepared dataset (``tokenized_path``, or a ``dataset_cache_dir/pretrain-*`` entry) or
one token store inside it (``PATH/train``). The store is checked as training checks it (sizes,
index, EOS at document ends) before anything is shown. Decoding uses ``--tokenizer``, by default
the tokenizer recorded when the dataset was prepared; without one, ids are printed.
The format is ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.cli import run_cli
from llmtrain.data.token_store import STORE_FILE, StoreDamaged, TokenStore, open_store
from llmtrain.errors import UserInputError

logger = logging.getLogger(__name__)

META_FILE = "llmtrain_meta.json"  # llmtrain.data.cache.META_FILE, without importing datasets
SPLITS = ("train", "validation")


def find_stores(path: Path) -> dict[str, TokenStore]:
    """The checked stores at ``path``: ``{split: store}`` for a prepared dataset, ``{name: store}`` for one store."""
    try:
        if (path / STORE_FILE).is_file():
            return {path.name: open_store(path)}
        stores = {split: open_store(path / split) for split in SPLITS if (path / split / STORE_FILE).is_file()}
    except StoreDamaged as error:
        raise UserInputError(f"{path}: damaged token store: {error}") from error
    if not stores:
        raise UserInputError(f"{path}: no token store here (no {STORE_FILE}, nor train/{STORE_FILE})")
    return stores


def recorded_tokenizer(path: Path) -> str | None:
    """The tokenizer the dataset at ``path`` (or the one holding the store at ``path``) was prepared with."""
    for directory in (path, path.parent):
        meta = directory / META_FILE
        if meta.is_file():
            stats: dict[str, Any] = json.loads(meta.read_text()).get("stats", {})
            return stats.get("tokenizer_name_or_path")
    return None


def summary(stores: dict[str, TokenStore], block_size: int) -> list[str]:
    """One line per store: documents, tokens, dtype, and blocks at ``block_size``."""
    return [
        f"{name}: {store.num_documents} documents, {store.num_tokens} tokens ({store.dtype}, EOS {store.eos_token_id}, "
        f"vocabulary {store.vocab_size}); {store.num_blocks(block_size)} blocks of {block_size}, "
        f"{store.num_tokens % block_size} tokens left over"
        for name, store in stores.items()
    ]


def token_ids(store: TokenStore, block: int | None, document: int | None, block_size: int) -> np.ndarray:
    """The ids of block ``block`` (a ``block_size`` window) or of document ``document`` (with its EOS)."""
    if block is not None:
        if not 0 <= block < store.num_blocks(block_size):
            raise UserInputError(
                f"--block {block}: the store has {store.num_blocks(block_size)} blocks of {block_size}"
            )
        return np.asarray(store.tokens()[block * block_size : (block + 1) * block_size])
    assert document is not None
    if not 0 <= document < store.num_documents:
        raise UserInputError(f"--document {document}: the store has {store.num_documents} documents")
    offsets = store.documents()
    return np.asarray(store.tokens()[int(offsets[document]) : int(offsets[document + 1])])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a prepared dataset dir, or one token store in it")
    parser.add_argument("--split", default="train", help="the split to show a block or document of")
    parser.add_argument("--block_size", type=int, default=1024, help="tokens per block (the run's block_size)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--block", type=int, help="decode this block")
    shown.add_argument("--document", type=int, help="decode this document")
    parser.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the one the data was prepared with)")
    args = parser.parse_args(argv)
    if args.block_size < 1:
        raise UserInputError(f"--block_size must be positive, got {args.block_size}")
    stores = find_stores(args.path)
    for line in summary(stores, args.block_size):
        sys.stdout.write(line + "\n")
    if args.block is None and args.document is None:
        return
    store = stores.get(args.split) if len(stores) > 1 else next(iter(stores.values()))
    if store is None:
        raise UserInputError(f"--split {args.split}: {args.path} has only {', '.join(stores)}")
    ids = token_ids(store, args.block, args.document, args.block_size)
    name = args.tokenizer or recorded_tokenizer(args.path)
    sys.stdout.write(f"ids: {ids.tolist()}\n")
    if name is None:
        logger.warning("no tokenizer given or recorded: showing ids only (pass --tokenizer to decode)")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    sys.stdout.write(f"text: {tokenizer.decode(ids.tolist())}\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
