"""A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches.

A `DataLoader(shuffle=True)` draws its order from a generator that restarts with the process, so after
`ckpt_path=last` the next epoch would be shuffled differently than in an uninterrupted run. Lightning
calls `set_epoch` on samplers that have it; under DDP/FSDP it wraps this sampler to split it across ranks.

`ResumableDataLoader` makes a resume in the middle of an epoch exact too: it skips the batches the run
already trained on in that epoch (counted by Lightning's own restored loop progress, see
`datamodules._batches_done_this_epoch`), so the resumed run sees exactly the batches the uninterrupted one
would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


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


class ResumableDataLoader(DataLoader):
    """A DataLoader whose next epoch starts `skip_batches` batches in (then 0 again).

    `skip_batches` is an `__init__` argument, so it survives Lightning re-creating the loader to insert its
    distributed sampler (it re-instantiates loaders from their constructor arguments).
    """

    def __init__(self, *args, skip_batches: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    # Lightning's resumable-loader interface: the position is restored from its own loop progress (see the
    # module docstring), so the loader's state holds nothing of its own
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        it = super().__iter__()
        skip, self.skip_batches = self.skip_batches, 0
        for _ in range(skip):  # the same order (the sampler is seeded by epoch), minus what was trained on
            if next(it, None) is None:
                break
        return it
