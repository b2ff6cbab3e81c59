"""The learning rate as a pure function of the iteration (linear scaling rule + warmup + steps).

Goyal et al. (2017) / MegDet: for a global batch k x the reference batch, the
learning rate is k x the reference lr, reached by a linear warmup from
``warmup_factor x lr``; iteration counts and decay steps shrink by k so that the
number of epochs stays the same. The world size enters here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvd_megdet.config import SolverConfig


@dataclass(frozen=True)
class Schedule:
    global_batch: int
    lr: float              # peak lr after scaling
    max_iter: int
    steps: tuple[int, ...]
    gamma: float
    warmup_iters: int
    warmup_factor: float

    @classmethod
    def from_config(cls, solver: SolverConfig, world_size: int) -> "Schedule":
        global_batch = solver.images_per_rank * world_size * solver.backward_passes_per_step
        k = global_batch / solver.reference_batch
        scale = (lambda it: max(1, round(it / k))) if solver.scale_schedule else (lambda it: it)
        max_iter = scale(solver.max_iter)
        steps = tuple(scale(s) for s in solver.steps)
        return cls(global_batch=global_batch, lr=solver.base_lr * k, max_iter=max_iter,
                   steps=steps, gamma=solver.gamma, warmup_iters=min(solver.warmup_iters, max_iter),
                   warmup_factor=solver.warmup_factor)

    def lr_at(self, it: int) -> float:
        """Learning rate for iteration ``it`` (0-based)."""
        lr = self.lr * self.gamma ** sum(it >= s for s in self.steps)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr

    def describe(self) -> str:
        return (f"global batch {self.global_batch}, lr {self.lr:.6g} (linear scaling), "
                f"warmup {self.warmup_iters} iters from x{self.warmup_factor:g}, "
                f"decay x{self.gamma:g} at {list(self.steps)}, {self.max_iter} iters")
