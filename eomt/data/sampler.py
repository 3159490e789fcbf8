"""Training order that survives a resume.

`ResumableSampler` is a DistributedSampler (per-epoch shuffle from the seed) that can start in
the middle of an epoch and yields `(index, epoch)` pairs. `SeededSamples` wraps a dataset so each
sample's augmentation is drawn from a generator seeded by (seed, epoch, index): the same sample
gets the same augmentation whichever worker loads it and whether or not the run was resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Begin `epoch` at its `start_batch`-th batch of this rank (0 = from the start)."""
        self.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for index in indices[self.start_batch * self.batch_size :]:
            yield index, self.epoch

    def __len__(self) -> int:
        return self.num_samples - self.start_batch * self.batch_size


class SeededSamples(Dataset):
    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + index
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # leave the caller's streams untouched
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
