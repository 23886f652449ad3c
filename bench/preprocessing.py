"""Preprocessing throughput: our tokenize + EOS stream vs a plain fast-tokenizer call and the recipe's ``group_texts``.

    python -m bench.preprocessing [--megabytes 3] [--repeats 5] [--tokenizer DIR] [--data FILE]

Text: the demo corpus (``llmtrain/assets/demo/pretrain_corpus.jsonl``), or ``--data FILE`` (a
pretraining corpus file in any format ``llmtrain.data.documents.iter_documents`` reads, documents
in its ``text`` field), repeated or cut to ``--megabytes``, in batches of 1,000 documents (the
``preprocessing_batch_size`` default), tokenized with the tiny tokenizer or ``--tokenizer DIR``
(e.g. the real Qwen2.5 one: uint32 ids in the store), block size 1024 (recipe). Three sides,
interleaved batch by batch; a side's time is the sum over batches of its median time per batch:

* **ours**: ``llmtrain.data.pretrain.BatchTokenizer``, what one prepare worker runs per batch (tokens +
  EOS per document, flattened into the token store's dtype with document lengths);
* **plain**: ``tokenizer(texts)``, the fast tokenizer's batch call with its defaults, nothing else;
* **recipe**: the plain call followed by the replaced recipe's ``group_texts`` (run_clm style:
  concatenate every column with ``itertools.chain``, cut into blocks, copy labels).

Headline: ours / plain in MB/s (target >= 0.90: building the stream may cost at most 10 % of tokenizing).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.common import Result, median, print_result, set_threads, timed
from llmtrain.data.documents import iter_documents
from llmtrain.data.pretrain import BatchTokenizer, DocumentBatch
from llmtrain.data.token_store import token_dtype
from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR

BLOCK_SIZE = 1024
BATCH_DOCUMENTS = 1000  # preprocessing_batch_size's default
TARGET = 0.90


def recipe_group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """The replaced recipe's ``group_texts`` (HF run_clm): concatenate, drop the tail, cut, labels = ids."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total_length = len(concatenated[next(iter(examples))])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def corpus_batches(megabytes: float, path: Path = DEMO_CORPUS_PATH) -> tuple[list[list[str]], int]:
    """The documents of ``path`` (blank ones left out, as the prepare workers skip them), repeated or cut to
    ``megabytes``, in batches of 1,000; and their size in bytes."""
    documents = [text for _, text in iter_documents(path) if text.strip()]
    target, texts, size = int(megabytes * 2**20), [], 0
    while size < target:
        for text in documents:
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= target:
                break
    return [texts[i : i + BATCH_DOCUMENTS] for i in range(0, len(texts), BATCH_DOCUMENTS)], size


def run(
    megabytes: float = 3.0, repeats: int = 5, tokenizer_dir: Path | None = None, data: Path | None = None
) -> Result:
    set_threads()
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tokenizer_dir or TINY_MODEL_DIR)
    batches, size = corpus_batches(megabytes, data or DEMO_CORPUS_PATH)

    ours = BatchTokenizer(tokenizer, token_dtype(len(tokenizer)))
    sides: dict[str, Callable[[list[str]], Any]] = {
        "ours": lambda batch: ours(DocumentBatch(batch, ["train"] * len(batch))),
        "plain": lambda batch: tokenizer(batch),
        "recipe": lambda batch: recipe_group_texts(dict(tokenizer(batch)), BLOCK_SIZE),
    }
    sides["ours"](batches[0])  # warm-up
    # Interleaved per batch (ours, plain, recipe on batch 1, then batch 2, ...): adjacent calls see
    # the same machine load. A side's time is the sum over batches of its median per batch.
    per_batch: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in sides}
    for _ in range(repeats):
        for index, batch in enumerate(batches):
            for name, side in sides.items():
                per_batch[name][index].append(timed(functools.partial(side, batch)))
    seconds = {name: sum(median(times) for times in per_batch[name]) for name in sides}
    rate = {name: size / 2**20 / total for name, total in seconds.items()}
    detail = {
        "tokenizer": f"{tokenizer_dir or 'tiny'} ({len(tokenizer)} ids, store dtype {ours.dtype})",
        "data": str(data or DEMO_CORPUS_PATH.name),
        "megabytes": round(size / 2**20, 2),
        "documents": sum(len(b) for b in batches),
        "ours_MB_per_s": round(rate["ours"], 2),
        "plain_MB_per_s": round(rate["plain"], 2),
        "recipe_MB_per_s": round(rate["recipe"], 2),
        "ours_vs_recipe": round(rate["ours"] / rate["recipe"], 2),
        "seconds": {name: round(total, 3) for name, total in seconds.items()},
    }
    ratio = rate["ours"] / rate["plain"]
    return Result("Tokenize + EOS stream MB/s, ours / plain tokenizer call", ratio, TARGET, True, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the tiny tokenizer)")
    parser.add_argument("--data", type=Path, help="pretraining corpus file (default: the demo corpus)")
    args = parser.parse_args()
    result = run(args.megabytes, args.repeats, tokenizer_dir=args.tokenizer, data=args.data)
    print_result(result)


if __name__ == "__main__":
    main()
