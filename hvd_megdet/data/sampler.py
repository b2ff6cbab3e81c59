"""A distributed, aspect-ratio-grouped, resumable batch sampler for iteration-based training.

Each epoch, the dataset is permuted by ``(seed, epoch)`` identically on every rank
and cut into ``size`` disjoint shards of ``len // size`` images (the remainder is
dropped, so shards are equal). Within a shard, batches hold images of one
aspect-ratio group (wide or tall) where possible; leftovers are combined at the
end of the epoch. Every rank therefore yields exactly
``(len // size) // batch_size`` batches per epoch: the same number of iterations
everywhere, which a collective-per-iteration job needs to never hang.

Items are ``(index, flip_seed)`` pairs, so augmentation is a pure function of the
position in the stream, and :meth:`batches` can start at any iteration (resume).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import torch


class DatasetTooSmall(ValueError):
    pass


class DistributedGroupedBatchSampler(torch.utils.data.Sampler):
    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, rank: int, size: int,
                 seed: int = 0, group_by_aspect_ratio: bool = True, start_iter: int = 0):
        n = len(aspect_ratios)
        if n // size < batch_size:
            raise DatasetTooSmall(
                f"dataset of {n} images is too small for one batch of {batch_size} per rank on {size} ranks "
                f"(needs at least {batch_size * size})")
        self.groups = [int(a >= 1.0) if group_by_aspect_ratio else 0 for a in aspect_ratios]
        self.batch_size, self.rank, self.size, self.seed = batch_size, rank, size, seed
        self.shard_len = n // size
        self.batches_per_epoch = self.shard_len // batch_size
        self.start_iter = start_iter

    def shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.groups), generator=g).tolist()
        return perm[self.rank * self.shard_len:(self.rank + 1) * self.shard_len]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        buckets: dict[int, list[int]] = {}
        out = []
        for i in self.shard(epoch):
            b = buckets.setdefault(self.groups[i], [])
            b.append(i)
            if len(b) == self.batch_size:
                out.append(b)
                buckets[self.groups[i]] = []
        rest = [i for b in buckets.values() for i in b]
        out += [rest[k:k + self.batch_size] for k in range(0, len(rest) - self.batch_size + 1, self.batch_size)]
        return out[:self.batches_per_epoch]

    def batches(self, start_iter: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Endless batches from global iteration ``start_iter`` on."""
        epoch, offset = divmod(start_iter, self.batches_per_epoch)
        for e in itertools.count(epoch):
            for k, batch in enumerate(self.epoch_batches(e)[offset:], start=offset):
                it = e * self.batches_per_epoch + k
                # flip seed: unique per (iteration, rank, slot), independent of workers
                yield [(i, ((self.seed * 7919 + it) * self.size + self.rank) * 1024 + j)
                       for j, i in enumerate(batch)]
            offset = 0

    def __iter__(self):
        return self.batches(self.start_iter)

    def __len__(self) -> int:  # per epoch; the stream itself is endless
        return self.batches_per_epoch
