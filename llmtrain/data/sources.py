"""Weighted pretraining sources: blocks drawn by weight (the weights' syntax: :mod:`llmtrain.config.sources`).

Each weighted ``train_files`` entry is a *source* with a token store of its own.
:class:`WeightedBlocks` draws blocks by weight: an epoch has as many samples as all sources hold
blocks together, and source *s* fills ``round(weight_s x total)`` of them (largest remainder), so
the realised token shares equal the weights up to one block. A source asked for fewer blocks than
it holds contributes a fixed pseudo-random subset; one asked for more repeats its blocks in
pseudo-random order. The Trainer's seeded sampler shuffles the samples every epoch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

PERMUTATION_SEED = 20240601  # which blocks a down-weighted source contributes; the order comes from the Trainer


def draws_per_source(available: list[int], weights: list[float]) -> list[int]:
    """Samples per source in one epoch of ``sum(available)`` samples: shares of the weights, largest remainder.

    >>> draws_per_source([100, 10], [0.5, 0.5])
    [55, 55]
    """
    total = sum(available)
    exact = [weight * total for weight in weights]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def affine_permutation(size: int, seed: int) -> tuple[int, int]:
    """``(a, b)`` with ``gcd(a, size) == 1``: ``(a * j + b) % size`` is a permutation of ``range(size)``.

    >>> a, b = affine_permutation(10, seed=1); sorted((a * j + b) % 10 for j in range(10)) == list(range(10))
    True
    """
    generator = np.random.default_rng([seed, size])
    if size <= 1:
        return 1, 0
    a = int(generator.integers(1, size))
    while math.gcd(a, size) != 1:
        a = a % (size - 1) + 1
    return a, int(generator.integers(0, size))


class WeightedBlocks(torch.utils.data.Dataset):
    """Blocks of several sources, drawn by weight (see the module docstring); ``source_of(i)`` says whose.

    >>> class Blocks(torch.utils.data.Dataset):
    ...     def __init__(self, name, n): self.name, self.n = name, n
    ...     def __len__(self): return self.n
    ...     def __getitem__(self, i): return {"input_ids": np.array([i]), "source": self.name}
    >>> mixed = WeightedBlocks([Blocks("a", 8), Blocks("b", 2)], [0.5, 0.5])
    >>> len(mixed), mixed.draws, sorted({int(mixed[i]["input_ids"][0]) for i in range(5, 10)})
    (10, [5, 5], [0, 1])
    """

    def __init__(self, blocks: list[Any], weights: list[float], seed: int = PERMUTATION_SEED) -> None:
        self.blocks = blocks
        self.weights = weights
        self.draws = draws_per_source([len(b) for b in blocks], weights)
        self.starts = np.cumsum([0, *self.draws])
        self.permutations = [affine_permutation(len(b), seed + index) for index, b in enumerate(blocks)]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right")) - 1

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        source = self.source_of(index)
        size = len(self.blocks[source])
        a, b = self.permutations[source]
        draw = index - int(self.starts[source])
        return self.blocks[source][(a * (draw % size) + b) % size]

    def shares(self, block_size: int) -> list[dict[str, Any]]:
        """Per source: weight, blocks held, blocks drawn per epoch, realised token share, passes over it."""
        total = max(len(self), 1)
        return [
            {
                "weight": round(weight, 4),
                "blocks": len(blocks),
                "drawn_per_epoch": draws,
                "tokens_per_epoch": draws * block_size,
                "token_share": round(draws / total, 4),
                "passes_per_epoch": round(draws / max(len(blocks), 1), 3),
            }
            for blocks, weight, draws in zip(self.blocks, self.weights, self.draws, strict=True)
        ]
