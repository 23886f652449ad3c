"""The training order: a function of the seed and the global sample index only, whatever the rank count.

Epoch *e* visits the samples in ``torch.randperm(num_samples)`` order drawn from a generator seeded
with ``seed + e``; optimizer step *s* of the epoch trains positions ``[s * G, (s + 1) * G)`` of that
order, ``G`` the global batch (per-device batch x accumulation x ranks). Rank *r* takes its
contiguous share of the step's ``G`` samples and cuts it into its micro-batches. The samples of a
step therefore do not depend on how many ranks share it: a run resumed on another number of ranks
with the same global batch trains, step for step, on exactly the samples the uninterrupted run
would have. The final ``num_samples % G`` positions of each epoch's order are left out (a partial
global batch would change the step's size); a training set smaller than one global batch makes
one step per epoch, its order repeated to fill it.

:class:`GlobalOrderBatchSampler` is the per-rank batch sampler; its iterator is stateful
(``state_dict`` / ``load_state_dict``), so torchdata's ``StatefulDataLoader`` saves and restores
its position exactly.

>>> two_ranks = [GlobalOrderBatchSampler(10, micro_batch=1, accumulation=2, rank=r, world_size=2, seed=0)
...              for r in (0, 1)]
>>> one_rank = GlobalOrderBatchSampler(10, micro_batch=1, accumulation=4, rank=0, world_size=1, seed=0)
>>> step_0 = sorted(i for sampler in two_ranks for batch in list(sampler)[:2] for i in batch)
>>> step_0 == sorted(i for batch in list(one_rank)[:4] for i in batch)
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llmtrain.errors import ConfigError


class GlobalOrderBatchSampler:
    """This rank's micro-batches (lists of sample indices) of the global order (module docstring)."""

    def __init__(
        self, num_samples: int, micro_batch: int, accumulation: int, rank: int, world_size: int, seed: int
    ) -> None:
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch = micro_batch * accumulation * world_size
        if num_samples < 1:
            raise ConfigError("the training set is empty")
        self.steps_per_epoch = max(1, num_samples // self.global_batch)
        self.epoch = 0
        self.start_step = 0  # where iterators of this epoch begin (set by resume_at; 0 again from the next epoch)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.accumulation

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_step = 0
        self.epoch = epoch

    def resume_at(self, global_step: int) -> None:
        """Begin at optimizer step ``global_step`` (steps already trained), from the order alone."""
        self.epoch, self.start_step = divmod(global_step, self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order: a seeded permutation, repeated when one global batch needs more samples."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return (
            order.repeat(-(-self.global_batch // self.num_samples)) if self.num_samples < self.global_batch else order
        )

    def step_samples(self, epoch: int, step: int) -> list[int]:
        """Every rank's samples of optimizer step ``step`` of ``epoch``, in global order."""
        return self.epoch_order(epoch)[step * self.global_batch : (step + 1) * self.global_batch].tolist()

    def geometry(self) -> dict[str, int]:
        """What a saved position is valid for: same samples, seed and batch layout."""
        return {"num_samples": self.num_samples, "seed": self.seed, "micro_batch": self.micro_batch,
                "accumulation": self.accumulation, "world_size": self.world_size, "rank": self.rank}  # fmt: skip

    def __iter__(self) -> RankIterator:
        # Not consumed here: a DataLoader iterator calls iter() on its sampler more than once while it starts.
        return RankIterator(self, self.epoch, self.start_step)


class RankIterator(Iterator[list[int]]):
    """One epoch of one rank's micro-batches, with its position as state (torchdata's ``Stateful``)."""

    def __init__(self, sampler: GlobalOrderBatchSampler, epoch: int, step: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.step = step
        self.micro = 0
        self._order = sampler.epoch_order(epoch)

    def __next__(self) -> list[int]:
        sampler = self.sampler
        if self.step >= sampler.steps_per_epoch:
            sampler.start_step = 0  # this epoch is done; a new pass over it starts at its beginning
            raise StopIteration
        share = sampler.micro_batch * sampler.accumulation
        start = self.step * sampler.global_batch + sampler.rank * share + self.micro * sampler.micro_batch
        batch = self._order[start : start + sampler.micro_batch].tolist()
        self.micro += 1
        if self.micro == sampler.accumulation:
            self.step, self.micro = self.step + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro, **self.sampler.geometry()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.sampler.geometry()
        saved = {key: state.get(key) for key in expected}
        if saved != expected:
            raise ValueError(f"the saved data order position is for {saved}, this loader is {expected}")
        if state["epoch"] != self.epoch:
            self._order = self.sampler.epoch_order(state["epoch"])
        self.epoch, self.step, self.micro = state["epoch"], state["step"], state["micro"]
