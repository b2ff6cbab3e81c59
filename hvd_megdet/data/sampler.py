"""A distributed, aspect-ratio-grouped batch sampler whose position is the number of images seen.

The training stream is the same on every world size: epoch ``e`` is a permutation of the
dataset drawn from ``(seed, e)`` and arranged in runs of ``CHUNK`` images of one aspect-ratio
group (wide or tall), and the stream is epoch 0, then epoch 1, ... without a break. Stream
position ``p`` (images seen) is image ``order(p // n)[p % n]``, augmented with a flip seed
that depends on ``p`` alone.

Each pass of an iteration consumes the next ``batch_size x size`` positions: rank ``r`` takes
the ``r``-th slice of ``batch_size``. So every rank yields the same number of batches (endless),
ranks never overlap, and a job resumed at ``images_seen`` on ANY number of ranks continues the
same epoch order, re-sharded, with no image of the interrupted epoch repeated or skipped.
A batch may straddle an epoch boundary. Runs of one aspect group do not depend on the world
size; a rank's batch mixes groups only where its slice crosses a run boundary.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import torch

from hvd_megdet.errors import UserError

CHUNK = 128  # images per run of one aspect-ratio group; independent of world size and batch


class DatasetTooSmall(UserError, ValueError):
    pass


class DistributedGroupedBatchSampler(torch.utils.data.Sampler):
    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, rank: int, size: int,
                 seed: int = 0, group_by_aspect_ratio: bool = True, start_images: int = 0):
        n = len(aspect_ratios)
        if n < batch_size * size:
            raise DatasetTooSmall(
                f"dataset of {n} images is too small for one batch of {batch_size} per rank on {size} ranks "
                f"(needs at least {batch_size * size})")
        self.groups = [int(a >= 1.0) if group_by_aspect_ratio else 0 for a in aspect_ratios]
        self.batch_size, self.rank, self.size, self.seed = batch_size, rank, size, seed
        self.start_images = start_images
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them (the same on every world size)."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.groups), generator=g).tolist()
            by_group: dict[int, list[int]] = {}
            for i in perm:
                by_group.setdefault(self.groups[i], []).append(i)
            full, tails = [], []
            for members in by_group.values():
                cut = len(members) - len(members) % CHUNK
                full += [members[k:k + CHUNK] for k in range(0, cut, CHUNK)]
                tails.append(members[cut:])
            where = {i: k for k, i in enumerate(perm)}  # interleave runs in permutation order
            runs = sorted(full, key=lambda r: where[r[0]]) + sorted((t for t in tails if t), key=lambda r: where[r[0]])
            self._orders = {epoch: [i for run in runs for i in run]}  # keep one epoch in memory
        return self._orders[epoch]

    def position(self, p: int) -> tuple[int, int]:
        """Dataset index and flip seed at stream position ``p``."""
        epoch, offset = divmod(p, len(self.groups))
        return self.epoch_order(epoch)[offset], self.seed * 2**40 + p

    def batches(self, start_images: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's endless batches of ``(index, flip_seed)``, from stream position ``start_images``."""
        step = self.batch_size * self.size
        for k in itertools.count():
            first = start_images + k * step + self.rank * self.batch_size
            yield [self.position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        return self.batches(self.start_images)

    def __len__(self) -> int:  # batches per epoch; the stream itself is endless
        return len(self.groups) // (self.batch_size * self.size)
