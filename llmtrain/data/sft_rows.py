"""The SFT row store: encoded conversations as flat token and label-mask streams that training memory-maps.

One split is a directory (the format is ``docs/sft.md``)::

    ids.bin         token ids, little-endian uint16 when the vocabulary fits, else uint32; rows back to back
    supervised.bin  one byte per token: 1 where the token is a label (an answer), 0 where it is -100
    positions.bin   splits with prefix trees only: each token's position id (its depth in its tree),
                    uint16 (uint32 beyond 65,536 positions); without it a row's positions are 0, 1, 2, ...
    rows.npy        uint64 offsets, one per row plus a final one: row r is ids[rows[r]:rows[r + 1]]
    packs.npy       packed splits only: int64 row indices, pack by pack (every row once)
    pack_rows.npy   packed splits only: uint64 offsets into packs.npy, one per pack plus a final one
    store.json      {"format": "llmtrain-sft-rows", "version": 1, "dtype": "<u2", "tokens": T, "rows": R,
                     "packs": P or null, "positions": "<u2" or null, "vocab_size": V}

:class:`SftRowsWriter` appends rows as they are encoded (memory bounded by one batch), then
:func:`pack_split` groups them into packed rows from their lengths alone (no token is copied) and
:func:`open_rows` checks the files before anything trains on them. :class:`SftRows` is the training
set: row *r* (or pack *p*) as ``input_ids`` / ``labels`` lists, labels -100 where the mask is 0,
and, for a pack, ``position_ids`` restarting at 0 for each of its rows::

    rows      0: [5 6 7]   1: [8 9]        pack 0 = rows 1, 0
    pack 0    input_ids    8 9 5 6 7     position_ids 0 1 0 1 2
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.fitting import concatenate_rows, pack_rows
from llmtrain.data.token_store import STORE_FILE, OffsetsWriter, StoreDamaged, token_dtype, write_store_meta
from llmtrain.loss import IGNORE_INDEX

FORMAT = "llmtrain-sft-rows"
VERSION = 1
IDS_FILE = "ids.bin"
MASK_FILE = "supervised.bin"
POSITIONS_FILE = "positions.bin"
ROWS_FILE = "rows.npy"
PACKS_FILE = "packs.npy"
PACK_OFFSETS_FILE = "pack_rows.npy"
ROWS_PARTIAL = "rows.partial"  # offsets as raw uint64 while writing; becomes rows.npy at close


@dataclass
class EncodedRows:
    """Rows back to back, as numpy arrays (cheap to hand between processes): ids, their label mask, row lengths.

    >>> rows = EncodedRows.of([[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]])
    >>> rows.ids.tolist(), rows.supervised.tolist(), rows.lengths.tolist()
    ([5, 6, 7, 8, 9], [0, 1, 1, 0, 1], [3, 2])
    """

    ids: np.ndarray
    supervised: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray | None = None  # each token's position id where a row is a prefix tree, else None

    @classmethod
    def of(
        cls, input_ids: list[list[int]], labels: list[list[int]], positions: list[list[int] | None] | None = None
    ) -> EncodedRows:
        """Rows given as lists: ids, labels (-100 where not supervised, else the id), and any tree row's positions."""
        if not input_ids:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64))
        flat_labels = np.concatenate([np.asarray(row, dtype=np.int64) for row in labels])
        flat_positions = None
        if positions is not None and any(row is not None for row in positions):
            flat_positions = np.concatenate([
                np.asarray(row if row is not None else range(len(ids)), dtype=np.int64)
                for row, ids in zip(positions, input_ids, strict=True)
            ])  # fmt: skip
        return cls(
            np.concatenate([np.asarray(row, dtype=np.int64) for row in input_ids]),
            (flat_labels != IGNORE_INDEX).astype(np.uint8),
            np.fromiter((len(row) for row in input_ids), dtype=np.int64, count=len(input_ids)),
            flat_positions,
        )


class SftRowsWriter:
    """Append encoded rows to a new split directory; :meth:`close` writes the row index and ``store.json``.

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp()) / "train"
    >>> writer = SftRowsWriter(directory, vocab_size=100)
    >>> writer.add(EncodedRows.of([[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]]))
    >>> writer.close()["rows"], SftRows(open_rows(directory))[1]
    (2, {'input_ids': [8, 9], 'labels': [-100, 9]})
    """

    def __init__(self, directory: Path, vocab_size: int, max_position: int | None = None) -> None:
        """``max_position``: the longest row, when rows may be prefix trees (their positions are stored)."""
        directory.mkdir(parents=True, exist_ok=False)
        self.directory = directory
        self.dtype = token_dtype(vocab_size)
        self.positions_dtype = token_dtype(max_position) if max_position is not None else None
        self.meta: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "dtype": self.dtype.str, "tokens": 0, "rows": 0, "packs": None,
            "positions": self.positions_dtype.str if self.positions_dtype is not None else None,
            "vocab_size": int(vocab_size),
        }  # fmt: skip
        self._ids = (directory / IDS_FILE).open("wb")
        self._mask = (directory / MASK_FILE).open("wb")
        self._positions = (directory / POSITIONS_FILE).open("wb") if self.positions_dtype is not None else None
        self._rows = OffsetsWriter(directory / ROWS_PARTIAL, directory / ROWS_FILE)

    def add(self, rows: EncodedRows) -> None:
        """Append a batch of encoded rows."""
        if not len(rows.lengths):
            return
        self._ids.write(np.ascontiguousarray(rows.ids, dtype=self.dtype).tobytes())
        self._mask.write(np.ascontiguousarray(rows.supervised, dtype=np.uint8).tobytes())
        if self._positions is not None:
            positions = rows.positions
            if positions is None:  # chains only: 0, 1, 2, ... in each row
                starts = np.repeat(np.cumsum(rows.lengths) - rows.lengths, rows.lengths)
                positions = np.arange(int(rows.lengths.sum())) - starts
            self._positions.write(np.ascontiguousarray(positions, dtype=self.positions_dtype).tobytes())
        elif rows.positions is not None:
            raise ValueError(f"{self.directory}: a prefix tree for a store made without positions")
        self._rows.add(rows.lengths)
        self.meta["tokens"] = self._rows.total
        self.meta["rows"] = self._rows.count

    def close(self) -> dict[str, Any]:
        """Finish the split; returns its ``store.json`` content."""
        for stream in (self._ids, self._mask, self._positions):
            if stream is not None:
                stream.close()
        self._rows.close()
        write_store_meta(self.directory, self.meta)
        return dict(self.meta)


def pack_order(lengths: np.ndarray, max_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows shuffled by ``seed``, then packed next-fit (:func:`~llmtrain.data.fitting.pack_rows`), as two arrays.

    Returns the row indices pack by pack and each pack's offsets into them (packs + 1). The shuffle
    mixes conversations of all lengths and sources into each pack.

    >>> rows, offsets = pack_order(np.array([3, 4, 2, 5, 1]), max_length=6, seed=0)
    >>> [rows[offsets[p] : offsets[p + 1]].tolist() for p in range(len(offsets) - 1)]
    [[2, 4], [3], [0], [1]]
    """
    order = np.random.default_rng(seed).permutation(len(lengths))
    sizes = [len(group) for group in pack_rows(lengths[order].tolist(), max_length)]
    return order.astype("<i8"), np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype("<u8")


def pack_split(directory: Path, max_length: int, seed: int) -> int:
    """Pack the rows of a closed split (:func:`pack_order`): write ``packs.npy``, ``pack_rows.npy``; the pack count."""
    rows = np.load(directory / ROWS_FILE)
    order, offsets = pack_order(np.diff(rows).astype(np.int64), max_length, seed)
    np.save(directory / PACKS_FILE, order)
    np.save(directory / PACK_OFFSETS_FILE, offsets)
    meta = json.loads((directory / STORE_FILE).read_text())
    meta["packs"] = len(offsets) - 1
    write_store_meta(directory, meta)
    return int(meta["packs"])


@dataclass(frozen=True)
class RowStore:
    """An opened, checked split: where it is and what its ``store.json`` says."""

    path: Path
    dtype: str
    num_tokens: int
    num_rows: int
    num_packs: int | None
    vocab_size: int
    positions: str | None = None  # the dtype of positions.bin, where the split has one

    def array(self, name: str) -> np.ndarray:
        """A token stream memory-mapped read-only (an empty split: an empty array)."""
        dtypes: dict[str, Any] = {IDS_FILE: self.dtype, MASK_FILE: np.uint8, POSITIONS_FILE: self.positions}
        dtype = np.dtype(dtypes[name])
        if self.num_tokens == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r")

    def index(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")


def open_rows(path: Path) -> RowStore:
    """Open the split at ``path`` after checking its files against ``store.json``.

    Raises :class:`~llmtrain.data.token_store.StoreDamaged` naming the file when ``store.json`` is
    unreadable, a stream has the wrong size, the row offsets do not run from 0 to the token count,
    or the packs do not hold every row once.
    """
    try:
        meta = json.loads((path / STORE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise StoreDamaged(f"{path / STORE_FILE}: unreadable ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreDamaged(f"{path / STORE_FILE}: not a version-{VERSION} {FORMAT}")
    packs = meta.get("packs")
    store = RowStore(path, meta["dtype"], int(meta["tokens"]), int(meta["rows"]),
                     None if packs is None else int(packs), int(meta["vocab_size"]), meta.get("positions"))  # fmt: skip
    streams = [(IDS_FILE, np.dtype(store.dtype).itemsize), (MASK_FILE, 1)]
    if store.positions is not None:
        streams.append((POSITIONS_FILE, np.dtype(store.positions).itemsize))
    for name, itemsize in streams:
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != store.num_tokens * itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise StoreDamaged(f"{file}: {found}, expected {store.num_tokens * itemsize} ({store.num_tokens} tokens)")
    offsets = _load_index(path / ROWS_FILE, store.num_rows + 1)
    if int(offsets[0]) != 0 or int(offsets[-1]) != store.num_tokens or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise StoreDamaged(f"{path / ROWS_FILE}: the row offsets do not run from 0 to {store.num_tokens}")
    if store.num_packs is not None:
        pack_offsets = _load_index(path / PACK_OFFSETS_FILE, store.num_packs + 1)
        order = _load_index(path / PACKS_FILE, store.num_rows)
        if int(pack_offsets[-1]) != store.num_rows or not np.array_equal(np.sort(order), np.arange(store.num_rows)):
            raise StoreDamaged(f"{path / PACKS_FILE}: the packs do not hold each of the {store.num_rows} rows once")
    return store


def _load_index(file: Path, length: int) -> np.ndarray:
    try:
        index = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise StoreDamaged(f"{file}: unreadable ({error})") from error
    if index.shape != (length,):
        raise StoreDamaged(f"{file}: {index.shape[0] if index.ndim else 0} entries, expected {length}")
    return index


class SftRows(torch.utils.data.Dataset):
    """The training (or eval) examples of a split: its rows, or its packs when the split is packed.

    Memory maps are opened lazily in each process (a DataLoader worker opens its own), so pickling
    the dataset never copies tokens.

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp()) / "train"
    >>> writer = SftRowsWriter(directory, vocab_size=100)
    >>> writer.add(EncodedRows.of([[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]])); _ = writer.close()
    >>> pack_split(directory, max_length=8, seed=1)
    1
    >>> SftRows(open_rows(directory))[0]
    {'input_ids': [5, 6, 7, 8, 9], 'labels': [-100, 6, 7, -100, 9], 'position_ids': [0, 1, 2, 0, 1]}
    """

    def __init__(self, store: RowStore) -> None:
        self.store = store
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.store.num_rows if self.store.num_packs is None else self.store.num_packs

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {"ids": self.store.array(IDS_FILE), "mask": self.store.array(MASK_FILE),
                            "rows": self.store.index(ROWS_FILE)}  # fmt: skip
            if self.store.positions is not None:
                self._arrays["positions"] = self.store.array(POSITIONS_FILE)
            if self.store.num_packs is not None:
                self._arrays["packs"] = self.store.index(PACKS_FILE)
                self._arrays["pack_rows"] = self.store.index(PACK_OFFSETS_FILE)
        return self._arrays

    def row_lengths(self) -> np.ndarray:
        """Every row's length (unpacked rows, whatever the split's packing)."""
        return np.diff(self._open()["rows"].astype(np.int64))

    def row(self, index: int) -> dict[str, list[int]]:
        """Row ``index`` (unpacked) as ``input_ids`` and ``labels``, and ``position_ids`` where stored (trees)."""
        arrays = self._open()
        start, end = int(arrays["rows"][index]), int(arrays["rows"][index + 1])
        ids = np.asarray(arrays["ids"][start:end], dtype=np.int64)
        labels = np.where(np.asarray(arrays["mask"][start:end], dtype=bool), ids, IGNORE_INDEX)
        row = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        if "positions" in arrays:
            row["position_ids"] = np.asarray(arrays["positions"][start:end], dtype=np.int64).tolist()
        return row

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        if self.store.num_packs is None:
            return self.row(index)
        arrays = self._open()
        start, end = int(arrays["pack_rows"][index]), int(arrays["pack_rows"][index + 1])
        return concatenate_rows([self.row(row) for row in arrays["packs"][start:end].tolist()])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}
