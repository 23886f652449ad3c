"""A conversation's training rows as one prefix tree: each shared prefix computed once, every row exactly as alone.

Under a template that rewrites history (Qwen3, Qwen3.5 think), a conversation becomes several rows
(:func:`llmtrain.data.chat_masks.supervised_char_spans`), and row *k + 1* repeats everything of row
*k* up to where turn *k*'s answer renders differently. Put the rows' tokens in a trie and flatten it
depth first: the flattened tokens, each token's **depth** (its position id: the position it has in
its own row) and its label (the token where some row supervises it, else -100). A token may attend
exactly to its ancestors (a causal mask along each root-to-leaf path), so every row's computation is
what it was alone, whatever the template::

    row 0:  a b c d          a ─ b ─┬─ c ─ d      tokens     a b c d e f
    row 1:  a b e f                 └─ e ─ f      depth      0 1 2 3 2 3

    ancestor mask (query row, key column)         a b c d e f
                                               a  1 . . . . .
                                               b  1 1 . . . .
                                               c  1 1 1 . . .
                                               d  1 1 1 1 . .
                                               e  1 1 . . 1 .
                                               f  1 1 . . 1 1

The depth sequence alone describes the tree: in depth-first order a node's subtree is the run of
tokens after it that are deeper, so the mask and each token's parent follow from the position ids
(:func:`ancestor_mask`, :func:`parent_positions`). A token's prediction target is its supervised
child's token (``shift_labels``), not the next token in the flattened order: after a branch, the
next flattened token belongs to another row. Consecutive conversations are consecutive trees
(each root has depth 0), so a packed row of trees needs nothing more. A plain row is a tree
without branches: a chain.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llmtrain.loss import IGNORE_INDEX


@dataclass
class _Node:
    token: int
    supervised_by: int = 0  # rows that supervise this token here
    children: dict[int, _Node] = field(default_factory=dict)  # insertion order: the rows' order


class PrefixTree:
    """A token trie of rows (``input_ids`` and ``labels`` each), added one by one within a token budget.

    >>> tree = PrefixTree(max_tokens=6)
    >>> tree.add({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}), len(tree)
    (True, 4)
    >>> tree.add({"input_ids": [1, 2, 5, 6], "labels": [-100, -100, -100, 6]}), len(tree)
    (True, 6)
    >>> tree.add({"input_ids": [1, 7], "labels": [-100, 7]}), len(tree)  # one more token: over the budget
    (False, 6)
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.roots: dict[int, _Node] = {}
        self.size = 0
        self.rows = 0

    def __len__(self) -> int:
        return self.size

    def add(self, row: Mapping[str, Sequence[int]]) -> bool:
        """Add ``row`` unless the tree would then exceed ``max_tokens`` tokens (then nothing is added: False)."""
        new = len(row["input_ids"]) - sum(1 for _ in _path(self.roots, row["input_ids"]))
        if self.rows and self.size + new > self.max_tokens:
            return False
        children = self.roots
        for token, label in zip(row["input_ids"], row["labels"], strict=True):
            node = children.get(token)
            if node is None:
                node = children[token] = _Node(token)
                self.size += 1
            node.supervised_by += label != IGNORE_INDEX
            children = node.children
        self.rows += 1
        return True

    def flatten(self) -> dict[str, list[int]] | None:
        """The tree depth first: ``input_ids``, ``labels`` and ``position_ids`` (depths); None where not exact.

        None when some token is supervised by two rows (the tree would count it once) or a token
        has two supervised children (one position cannot predict two tokens).
        """
        flat: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        stack = [(node, 0) for node in reversed(self.roots.values())]
        while stack:
            node, depth = stack.pop()
            if node.supervised_by > 1 or sum(child.supervised_by > 0 for child in node.children.values()) > 1:
                return None
            flat["input_ids"].append(node.token)
            flat["labels"].append(node.token if node.supervised_by else IGNORE_INDEX)
            flat["position_ids"].append(depth)
            stack += [(child, depth + 1) for child in reversed(node.children.values())]
        return flat


def _path(roots: dict[int, _Node], tokens: Sequence[int]) -> Iterator[_Node]:
    """The nodes of the longest prefix of ``tokens`` already in the trie."""
    children = roots
    for token in tokens:
        node = children.get(token)
        if node is None:
            return
        yield node
        children = node.children


def share_prefixes(rows: Sequence[dict[str, Sequence[int]]]) -> dict[str, list[int]] | None:
    """``rows`` (``input_ids`` and ``labels`` each) as one flattened prefix tree, or None where it cannot be exact.

    Returns ``input_ids``, ``labels`` (a token's own id where a row supervises it, else -100) and
    ``position_ids`` (depths); see :meth:`PrefixTree.flatten` for when it is None.

    >>> tree = share_prefixes([{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    ...                        {"input_ids": [1, 2, 5, 6], "labels": [-100, -100, -100, 6]}])
    >>> tree["input_ids"], tree["position_ids"], tree["labels"]
    ([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 2, 3], [-100, -100, 3, 4, -100, 6])
    """
    tree = PrefixTree(max_tokens=sum(len(row["input_ids"]) for row in rows))
    for row in rows:
        tree.add(row)
    return tree.flatten()


def tree_samples(rows: Sequence[dict[str, list[int]]], max_tokens: int) -> list[dict[str, list[int]]]:
    """A conversation's rows as training samples: consecutive rows merged into trees of at most ``max_tokens``.

    Rows are added in order while the tree stays within the budget; a tree of one row stays that
    row (no ``position_ids``), and rows whose tree would not be exact stay rows.

    >>> rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 4, 5], "labels": [-100, -100, 5]}]
    >>> [sample.get("position_ids") for sample in tree_samples(rows, max_tokens=5)]
    [[0, 1, 2, 1, 2]]
    >>> [sample.get("position_ids") for sample in tree_samples(rows, max_tokens=4)]
    [None, None]
    """
    samples: list[dict[str, list[int]]] = []
    group: list[dict[str, list[int]]] = []
    tree = PrefixTree(max_tokens)
    for row in [*rows, None]:
        if row is not None and tree.add(row):
            group.append(row)
            continue
        flat = tree.flatten() if len(group) > 1 else None
        samples += [flat] if flat is not None else group
        group, tree = [], PrefixTree(max_tokens)
        if row is not None:
            tree.add(row)
            group.append(row)
    return samples


def subtree_ends(depths: torch.Tensor) -> torch.Tensor:
    """For each position of a depth-first ``[L]`` depth sequence, the end (exclusive) of its subtree.

    >>> subtree_ends(torch.tensor([0, 1, 2, 3, 2, 3, 0])).tolist()
    [6, 6, 4, 4, 6, 6, 7]
    """
    length = depths.shape[0]
    ends = torch.full((length,), length, dtype=torch.long)
    stack: list[int] = []
    for position, depth in enumerate(depths.tolist()):
        while stack and depths[stack[-1]] >= depth:
            ends[stack.pop()] = position
        stack.append(position)
    return ends


def ancestor_mask(depths: torch.Tensor) -> torch.Tensor:
    """``[L, L]`` bool: query ``i`` may attend key ``j`` iff ``j`` is ``i`` or one of its ancestors.

    In depth-first order ``j`` is an ancestor of ``i`` exactly when ``j <= i < end of j's subtree``.

    >>> ancestor_mask(torch.tensor([0, 1, 1])).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    positions = torch.arange(depths.shape[0])
    ends = subtree_ends(depths)
    return (positions[None, :] <= positions[:, None]) & (positions[:, None] < ends[None, :])


def parent_positions(depths: torch.Tensor) -> torch.Tensor:
    """Each position's parent position in a depth-first ``[L]`` depth sequence (-1 for a root).

    >>> parent_positions(torch.tensor([0, 1, 2, 1, 0, 1])).tolist()
    [-1, 0, 1, 0, -1, 4]
    """
    parents = torch.full((depths.shape[0],), -1, dtype=torch.long)
    path: list[int] = []  # the current root-to-node path, one position per depth
    for position, depth in enumerate(depths.tolist()):
        del path[depth:]
        if path:
            parents[position] = path[-1]
        path.append(position)
    return parents


def tree_shift_labels(labels: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the label of its supervised child (-100 where none), for ``[L]`` tensors.

    >>> tree_shift_labels(torch.tensor([-100, -100, 3, 4, -100, 6]), torch.tensor([0, 1, 2, 3, 2, 3])).tolist()
    [-100, 3, 4, -100, 6, -100]
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    parents = parent_positions(depths)
    supervised = (labels != IGNORE_INDEX) & (parents >= 0)
    shifted[parents[supervised]] = labels[supervised]
    return shifted
