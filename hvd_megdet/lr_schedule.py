"""The learning rate as a pure function of the number of images seen (linear scaling rule +
warmup + steps).

Goyal et al. (2017) / MegDet: for a global batch k x the reference batch, the learning rate
is k x the reference lr, reached by a linear warmup from ``warmup_factor x lr``. Every
iteration-valued setting (max_iter, steps, warmup_iters, and the train periods) is given at
the reference batch, i.e. it is a number of *images*: ``iters x reference_batch``. Progress is
counted in images seen, so the same schedule holds on any world size and a job resumed on
another number of ranks continues at the same image count (the iteration number is derived).

With ``solver.scale_schedule: false`` the settings are taken literally as iterations of the
actual global batch (resuming on another world size then changes the run's length in images).
The world size enters here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hvd_megdet.config import SolverConfig


@dataclass(frozen=True)
class Schedule:
    global_batch: int      # images per iteration, all ranks and backward passes
    lr: float              # peak lr after linear scaling
    unit: int              # images per configured iteration (reference_batch, or global_batch if not scaled)
    total_images: int
    step_images: tuple[int, ...]
    warmup_images: int
    gamma: float
    warmup_factor: float

    @classmethod
    def from_config(cls, solver: SolverConfig, world_size: int) -> "Schedule":
        global_batch = solver.images_per_rank * world_size * solver.backward_passes_per_step
        unit = solver.reference_batch if solver.scale_schedule else global_batch
        total = solver.max_iter * unit
        return cls(global_batch=global_batch, lr=solver.base_lr * global_batch / solver.reference_batch,
                   unit=unit, total_images=total, step_images=tuple(s * unit for s in solver.steps),
                   warmup_images=min(solver.warmup_iters * unit, total), gamma=solver.gamma,
                   warmup_factor=solver.warmup_factor)

    # --- images <-> iterations of this global batch ---------------------------
    def iters(self, images: int) -> int:
        """Iterations of this global batch needed to see ``images`` images (rounded up, >= 1 if > 0)."""
        return math.ceil(images / self.global_batch)

    def period_images(self, configured_iters: int) -> int:
        """A period given in configured iterations (e.g. train.checkpoint_period), in images."""
        return configured_iters * self.unit

    @property
    def max_iter(self) -> int:
        return self.iters(self.total_images)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(self.iters(s) for s in self.step_images)

    @property
    def warmup_iters(self) -> int:
        return self.iters(self.warmup_images)

    def lr_at(self, images: int) -> float:
        """Learning rate of the iteration that starts after ``images`` images have been seen."""
        lr = self.lr * self.gamma ** sum(images >= s for s in self.step_images)
        if images < self.warmup_images:
            alpha = images / self.warmup_images
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr

    def describe(self) -> str:
        return (f"global batch {self.global_batch}, lr {self.lr:.6g} (linear scaling), "
                f"warmup {self.warmup_iters} iters ({self.warmup_images} images) from x{self.warmup_factor:g}, "
                f"decay x{self.gamma:g} at {list(self.steps)}, {self.max_iter} iters "
                f"({self.total_images} images)")
