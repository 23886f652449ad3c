"""The token store: a tokenized corpus as one flat stream of token ids that every rank memory-maps.

One store is a directory (the format is ``docs/data.md``)::

    tokens.bin     token ids, little-endian uint16 when the vocabulary fits (<= 65,536 ids), else uint32;
                   every document's tokens followed by EOS, documents back to back
    documents.npy  uint64 offsets, one per document plus a final one: document d is
                   tokens[offsets[d]:offsets[d + 1]], its EOS last
    store.json     {"format": "llmtrain-token-store", "version": 1, "dtype": "<u2", "tokens": N,
                    "documents": D, "eos_token_id": E, "vocab_size": V}

Read with numpy alone::

    meta = json.load(open("store.json"))
    tokens = np.memmap("tokens.bin", dtype=meta["dtype"], mode="r")
    block_i = tokens[i * block_size : (i + 1) * block_size]

Training blocks are fixed windows of the stream (:class:`TokenBlocks`): block *i* is tokens
``[i * block_size, (i + 1) * block_size)``, so only the final remainder (fewer than ``block_size``
tokens) is never trained on. :class:`TokenStoreWriter` writes a store in one pass with memory
bounded by one batch of documents; :func:`open_store` checks a store's files against its
``store.json`` before anything reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "llmtrain-token-store"
VERSION = 1
TOKENS_FILE = "tokens.bin"
DOCUMENTS_FILE = "documents.npy"
STORE_FILE = "store.json"
OFFSETS_PARTIAL = "documents.partial"  # offsets as raw uint64 while writing; becomes documents.npy at close
CHECKED_DOCUMENT_ENDS = 4096  # documents whose final EOS is checked when a store is opened (spread evenly)
COPY_CHUNK = 1 << 20  # offsets per chunk when a .partial offsets file becomes its .npy (OffsetsWriter.close)


class StoreDamaged(ValueError):
    """A token store's files do not match its ``store.json``; the message names the file and the fault."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id of a vocabulary.

    >>> token_dtype(4096).str, token_dtype(151_936).str
    ('<u2', '<u4')
    """
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class OffsetsWriter:
    """Where each item (a document, a row) ends, appended as items come, finished as an ``.npy`` index.

    The ends go to ``partial`` as raw uint64 while writing; :meth:`close` copies them in chunks into
    ``final`` (items + 1 offsets from 0) and removes ``partial``, so neither side is held in memory.

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp())
    >>> offsets = OffsetsWriter(directory / "ends.partial", directory / "ends.npy")
    >>> offsets.add(np.array([3, 2])); offsets.add(np.array([4]))
    >>> offsets.total, offsets.count
    (9, 3)
    >>> offsets.close(); np.load(directory / "ends.npy").tolist(), (directory / "ends.partial").exists()
    ([0, 3, 5, 9], False)
    """

    def __init__(self, partial: Path, final: Path) -> None:
        self.partial = partial
        self.final = final
        self.total = 0  # the end of the last item: every item's length, summed
        self.count = 0
        self._stream = partial.open("wb")
        self._stream.write(np.zeros(1, dtype="<u8").tobytes())

    def add(self, lengths: np.ndarray) -> None:
        """Append the ends of items of these lengths (none: nothing changes)."""
        if len(lengths) == 0:
            return
        ends = self.total + np.cumsum(lengths, dtype=np.uint64)
        self._stream.write(ends.astype("<u8").tobytes())
        self.total = int(ends[-1])
        self.count += len(lengths)

    def close(self) -> None:
        """Write ``final`` from ``partial`` and remove ``partial``."""
        self._stream.close()
        raw = np.memmap(self.partial, dtype="<u8", mode="r")
        index = np.lib.format.open_memmap(self.final, mode="w+", dtype="<u8", shape=(self.count + 1,))
        for start in range(0, len(raw), COPY_CHUNK):
            index[start : start + COPY_CHUNK] = raw[start : start + COPY_CHUNK]
        index.flush()
        del index, raw
        self.partial.unlink()


class TokenStoreWriter:
    """Append documents (tokens with their EOS) to a new store; :meth:`close` writes the index and metadata.

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp()) / "train"
    >>> writer = TokenStoreWriter(directory, vocab_size=100, eos_token_id=0)
    >>> writer.add(np.array([5, 6, 0, 7, 0]), np.array([3, 2]))
    >>> writer.close()["tokens"], open_store(directory).documents().tolist()
    (5, [0, 3, 5])
    """

    def __init__(self, directory: Path, vocab_size: int, eos_token_id: int) -> None:
        directory.mkdir(parents=True, exist_ok=False)
        self.directory = directory
        self.dtype = token_dtype(vocab_size)
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.str,
            "tokens": 0,
            "documents": 0,
            "eos_token_id": int(eos_token_id),
            "vocab_size": int(vocab_size),
        }
        self._tokens = (directory / TOKENS_FILE).open("wb")
        self._documents = OffsetsWriter(directory / OFFSETS_PARTIAL, directory / DOCUMENTS_FILE)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` back to back (each ending with EOS), ``lengths`` their sizes with EOS."""
        if len(lengths) == 0:
            return
        self._tokens.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._documents.add(lengths)
        self.meta["tokens"] = self._documents.total
        self.meta["documents"] = self._documents.count

    def close(self) -> dict[str, Any]:
        """Finish the store; returns its ``store.json`` content."""
        self._tokens.close()
        self._documents.close()
        write_store_meta(self.directory, self.meta)
        return dict(self.meta)


def write_store_meta(directory: Path, meta: dict[str, Any]) -> None:
    """A store's ``store.json`` (written last: a store without it is unfinished)."""
    (directory / STORE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


@dataclass(frozen=True)
class TokenStore:
    """An opened, checked store: where it is and what its ``store.json`` says."""

    path: Path
    dtype: str
    num_tokens: int
    num_documents: int
    eos_token_id: int
    vocab_size: int

    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped read-only (nothing is read until indexed)."""
        if self.num_tokens == 0:  # an empty file cannot be mapped
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path / TOKENS_FILE, dtype=self.dtype, mode="r")

    def documents(self) -> np.ndarray:
        """Document offsets (``num_documents + 1``), memory-mapped."""
        return np.load(self.path / DOCUMENTS_FILE, mmap_mode="r")

    def num_blocks(self, block_size: int) -> int:
        return self.num_tokens // block_size


def open_store(path: Path) -> TokenStore:
    """Open the store at ``path`` after checking its files against ``store.json``.

    Raises :class:`StoreDamaged` naming the file when ``store.json`` is unreadable, ``tokens.bin``
    or ``documents.npy`` has the wrong size or shape, the offsets do not end at the token count, or
    a checked document (up to :data:`CHECKED_DOCUMENT_ENDS`, spread over the store) does not end with EOS.
    """
    try:
        meta = json.loads((path / STORE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise StoreDamaged(f"{path / STORE_FILE}: unreadable ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreDamaged(f"{path / STORE_FILE}: not a version-{VERSION} {FORMAT}")
    store = TokenStore(
        path, meta["dtype"], int(meta["tokens"]), int(meta["documents"]), int(meta["eos_token_id"]),
        int(meta["vocab_size"]),
    )  # fmt: skip
    tokens_path = path / TOKENS_FILE
    expected = store.num_tokens * np.dtype(store.dtype).itemsize
    size = tokens_path.stat().st_size if tokens_path.is_file() else None
    if size != expected:
        found = "missing" if size is None else f"{size} bytes"
        raise StoreDamaged(f"{tokens_path}: {found}, expected {expected} ({store.num_tokens} tokens)")
    try:
        offsets = store.documents()
    except (OSError, ValueError) as error:
        raise StoreDamaged(f"{path / DOCUMENTS_FILE}: unreadable ({error})") from error
    if offsets.shape != (store.num_documents + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != store.num_tokens:
        raise StoreDamaged(
            f"{path / DOCUMENTS_FILE}: {offsets.shape[0]} offsets ending at {int(offsets[-1]) if len(offsets) else 0}, "
            f"expected {store.num_documents + 1} ending at {store.num_tokens}"
        )
    if store.num_documents:
        picked = np.unique(np.linspace(1, store.num_documents, num=min(CHECKED_DOCUMENT_ENDS, store.num_documents)))
        ends = np.asarray(offsets[picked.astype(np.int64)], dtype=np.int64) - 1
        wrong = np.flatnonzero(np.asarray(store.tokens()[ends]) != store.eos_token_id)
        if len(wrong):
            document = int(picked[wrong[0]]) - 1
            raise StoreDamaged(
                f"{tokens_path}: document {document} does not end with EOS {store.eos_token_id} "
                f"(token {int(ends[wrong[0]])}): the stream does not match its index"
            )
    return store


class TokenBlocks(torch.utils.data.Dataset):
    """Training examples: fixed ``block_size`` windows of a store's stream, ``{"input_ids": int64 array}``.

    The memory map is opened lazily in each process (a DataLoader worker opens its own), so
    pickling the dataset never copies tokens.

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp()) / "s"
    >>> writer = TokenStoreWriter(directory, vocab_size=100, eos_token_id=0)
    >>> writer.add(np.array([5, 6, 0, 7, 8, 9, 0]), np.array([3, 4])); _ = writer.close()
    >>> blocks = TokenBlocks(open_store(directory), block_size=3)
    >>> len(blocks), blocks[1]["input_ids"].tolist()
    (2, [7, 8, 9])
    """

    def __init__(self, store: TokenStore, block_size: int) -> None:
        self.store = store
        self.block_size = block_size
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return self.store.num_blocks(self.block_size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        if self._tokens is None:
            self._tokens = self.store.tokens()
        start = index * self.block_size
        return {"input_ids": np.asarray(self._tokens[start : start + self.block_size], dtype=np.int64)}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}
