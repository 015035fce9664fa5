"""A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches.

A `DataLoader(shuffle=True)` draws its order from a generator that restarts with the process, so after
`ckpt_path=last` the next epoch would be shuffled differently than in an uninterrupted run. Lightning
calls `set_epoch` on samplers that have it; under DDP/FSDP it wraps this sampler to split it across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of `range(n)` seeded by `seed + epoch`."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
