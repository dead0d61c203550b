"""Samplers and per-sample seeding of both tasks' loaders.

Training: :class:`ResumableSampler` yields ``(epoch, position, index)`` keys, the epoch's draws
split over ranks, and can start an epoch part-way (a resume from a mid-epoch checkpoint);
:class:`SeededSamples` makes every random draw of a sample's loading and augmentation a function
of (SEED, epoch, key), so a resumed epoch repeats the uninterrupted one whichever worker or rank
loads the sample. Validation: :class:`ShardSampler`, every sample exactly once across ranks.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from utils import derive_seed, seed_all

from .seg_pipeline import item_rng


class ResumableSampler(Sampler):
    """The draws of one epoch: ``num_samples`` per rank from permutations of the dataset, seeded
    from (``seed``, epoch), laid end to end (an image appears several times when the epoch is
    longer than the dataset; with ``num_samples`` = ceil(len / ranks), each image once, and the
    few draws that fill the ranks' equal shares from the next permutation), taken by rank ``rank`` at positions ``rank``,
    ``rank + num_replicas``, ... Yields ``(epoch, position, index)``; ``set_epoch(epoch,
    start_index)`` selects the epoch and skips this rank's first ``start_index`` draws. On one
    process and one permutation the order is torch's DistributedSampler's."""

    def __init__(self, dataset: Dataset, num_samples: int, num_replicas: int, rank: int,
                 seed: int) -> None:
        self.size, self.num_samples = len(dataset), num_samples
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = self.start_index = 0

    @classmethod
    def one_pass(cls, dataset: Dataset, num_replicas: int, rank: int,
                 seed: int) -> "ResumableSampler":
        """Each image once per epoch (padded to equal shares): a classification epoch."""
        return cls(dataset, -(-len(dataset) // num_replicas), num_replicas, rank, seed)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch, self.start_index = epoch, start_index

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        total = self.num_samples * self.num_replicas
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.cat([torch.randperm(self.size, generator=g)
                           for _ in range(-(-total // self.size))])[:total].tolist()
        positions = range(self.rank, total, self.num_replicas)  # this rank's draws, interleaved
        return ((self.epoch, p, order[p])
                for p in itertools.islice(positions, self.start_index, None))

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class SeededSamples(Dataset):
    """A training dataset keyed by ``(epoch, position, index)`` (:class:`ResumableSampler`).
    A dataset with ``draw(index, rng)`` (segmentation) gets a NumPy generator of (``seed``, epoch,
    position): the repeats of an image within an epoch differ. Any other dataset (image folders,
    whose timm transforms draw from the global generators) is loaded after python's ``random``,
    NumPy and torch are seeded from (``seed``, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, position, index = key
        if hasattr(self.dataset, "draw"):
            return self.dataset.draw(index, item_rng(self.seed, epoch, position))
        seed_all(derive_seed(self.seed, epoch, index), accelerators=False)
        return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Rank r of w takes samples r, r + w, r + 2w, ... in order: across ranks every sample
    appears exactly once (no padding, no duplicates)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
