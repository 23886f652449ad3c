"""The training order: the same samples per optimizer step for any rank count, and a loader state that resumes it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmtrain.data.order import GlobalOrderBatchSampler
from llmtrain.run.ledger import LEDGER_DIR, samples_per_step
from llmtrain.run.trainer import IndexedCollator, IndexedSamples, TrainLoader

SAMPLES = 103  # not a multiple of any global batch below: the partial one is left out


def steps(world_size: int, accumulation: int, micro_batch: int = 2, epoch: int = 0) -> list[list[int]]:
    """Every optimizer step's samples (all ranks together, sorted) of one epoch."""
    samplers = [GlobalOrderBatchSampler(SAMPLES, micro_batch, accumulation, rank, world_size, seed=7)
                for rank in range(world_size)]  # fmt: skip
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [list(sampler) for sampler in samplers]
    return [sorted(i for batches in per_rank for batch in batches[s * accumulation : (s + 1) * accumulation]
                   for i in batch) for s in range(samplers[0].steps_per_epoch)]  # fmt: skip


def test_a_step_trains_the_same_samples_on_any_rank_count_with_the_same_global_batch() -> None:
    reference = steps(world_size=2, accumulation=2)
    assert len(reference) == SAMPLES // 8 and all(len(step) == 8 for step in reference)
    assert steps(world_size=1, accumulation=4) == reference
    assert steps(world_size=4, accumulation=1) == reference
    flat = [i for step in reference for i in step]
    assert len(set(flat)) == len(flat), "no sample twice in an epoch"
    assert steps(world_size=2, accumulation=2, epoch=1) != reference  # each epoch its own order


def test_resume_at_a_step_continues_the_order_there() -> None:
    sampler = GlobalOrderBatchSampler(SAMPLES, 2, 2, rank=1, world_size=2, seed=7)
    whole = list(sampler)
    sampler.resume_at(3)
    assert (sampler.epoch, sampler.start_step) == (0, 3)
    iter(sampler)  # a DataLoader iterator calls iter() on its sampler more than once while it starts
    assert list(iter(sampler)) == whole[3 * 2 :]
    assert list(iter(sampler)) == whole  # that epoch was finished: another pass starts at its beginning
    sampler.set_epoch(1)
    assert len(list(sampler)) == len(whole)  # the next epoch starts at its beginning
    sampler.resume_at(sampler.steps_per_epoch + 2)
    assert (sampler.epoch, sampler.start_step) == (1, 2)


def test_a_training_set_smaller_than_one_global_batch_fills_one_step_by_repeating_its_order() -> None:
    samplers = [GlobalOrderBatchSampler(3, micro_batch=2, accumulation=2, rank=r, world_size=2, seed=0) for r in (0, 1)]
    batches = [batch for sampler in samplers for batch in sampler]
    assert len(samplers[0]) == 2 and len(batches) == 4  # one step of 2 micro-batches per rank
    counts = Counter(i for batch in batches for i in batch)
    assert set(counts) == {0, 1, 2} and sorted(counts.values()) == [2, 3, 3]  # the order of 3, repeated, cut at 8


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stateful_loader_resumes_exactly_from_its_saved_state(workers: int) -> None:
    dataset = IndexedSamples([{"input_ids": [i, i + 1]} for i in range(SAMPLES)])

    def loader() -> TrainLoader:
        sampler = GlobalOrderBatchSampler(SAMPLES, 2, 2, rank=0, world_size=2, seed=7)
        collate = IndexedCollator(lambda features: {"input_ids": torch.tensor([f["input_ids"] for f in features])})
        return TrainLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)

    uninterrupted = [batch["sample_indices"].tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    consumed = [next(iterator)["sample_indices"].tolist() for _ in range(5)]
    state = first.state_dict()
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    assert consumed + [batch["sample_indices"].tolist() for batch in resumed] == uninterrupted


def test_samples_per_step_counts_the_ranks_of_the_last_attempt(tmp_path: Path) -> None:
    ledger = tmp_path / LEDGER_DIR
    ledger.mkdir()
    lines = {0: [{"step": 1, "batches": ["a"], "samples": [[1, 2]], "world_size": 2},
                 {"step": 2, "batches": ["b"], "samples": [[5, 6]], "world_size": 2},
                 {"step": 2, "batches": ["c", "d"], "samples": [[5, 6], [7, 8]], "world_size": 1}],  # resumed alone
             1: [{"step": 1, "batches": ["e"], "samples": [[3, 4]], "world_size": 2},
                 {"step": 2, "batches": ["f"], "samples": [[7, 8]], "world_size": 2}]}  # fmt: skip
    for rank, entries in lines.items():
        (ledger / f"rank-{rank}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert samples_per_step(tmp_path) == {1: [1, 2, 3, 4], 2: [5, 6, 7, 8]}


def test_verify_resume_reports_a_step_whose_samples_differ(tmp_path: Path) -> None:
    from llmtrain.tools.verify_resume import sample_differences

    for name, second in (("reference", [[5, 6]]), ("resumed", [[5, 9]])):
        (tmp_path / name / LEDGER_DIR).mkdir(parents=True)
        entries = [{"step": 1, "batches": ["a"], "samples": [[1, 2]], "world_size": 1},
                   {"step": 2, "batches": ["b"], "samples": second, "world_size": 1}]  # fmt: skip
        (tmp_path / name / LEDGER_DIR / "rank-0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert sample_differences(tmp_path / "reference", tmp_path / "reference") == []
    assert sample_differences(tmp_path / "reference", tmp_path / "resumed") == ["step 2: samples [5, 6] vs [5, 9]"]
