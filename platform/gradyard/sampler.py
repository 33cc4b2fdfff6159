"""Deterministic, resumable sharding of a dataset across DDP ranks.

Each epoch is one global permutation drawn from (seed, epoch).  A run that
has consumed ``consumed`` samples of the epoch (all ranks together) continues
with ``perm[consumed:]``, dealt round-robin to the ranks.  With an unchanged
world size this is exactly the order the uninterrupted run would have seen:
rank r's j-th sample is ``perm[r + j * world]`` either way.  The position is
reached by index arithmetic, never by iterating a DataLoader, and a changed
world size (elastic training) resumes without replaying or skipping a sample.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=g)


class ShardSampler(Sampler[int]):
    def __init__(self, n: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True):
        if n < world_size:
            raise ValueError(f"dataset of {n} samples is smaller than {world_size} workers")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Start ``epoch`` after ``consumed`` samples (all ranks together) were used."""
        self.epoch, self.consumed = epoch, consumed

    def per_rank(self) -> int:
        """Samples each rank sees in this epoch from the current position (equal on all ranks)."""
        return (self.n - self.consumed) // self.world_size

    def __len__(self) -> int:
        return self.per_rank()

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        rest = perm[self.consumed:]
        # Equal length on every rank keeps DDP in lockstep; the few left-over
        # samples of an epoch are dropped (they differ every epoch).
        rest = rest[: self.per_rank() * self.world_size]
        return iter(rest[self.rank :: self.world_size].tolist())

    @staticmethod
    def epoch_size(n: int, world_size: int) -> int:
        return n // world_size
