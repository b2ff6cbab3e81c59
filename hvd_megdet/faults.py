"""Failures injected on purpose, for tests: ``HVD_MEGDET_FAULT=rank:1,iter:7,kind:kill``.

Kinds: ``kill`` (SIGKILL this rank: a dead process or node), ``raise`` (an exception: a crash),
``hang`` (sleep forever inside the loop: a stuck GPU or filesystem), ``nan`` (a non-finite loss),
``term`` (SIGTERM to this rank alone). The fault fires at the start of iteration ``iter`` on
``rank``, on attempt ``attempt`` only (default 0, the first; ``any`` = every attempt): launchers
set ``HVD_MEGDET_ATTEMPT`` (the SLURM template from SLURM_RESTART_COUNT, scripts/run.py its own
count), so a relaunched job does not meet the same fault again unless asked to.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

KINDS = ("kill", "raise", "hang", "nan", "term")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    rank: int
    iteration: int
    kind: str
    attempt: int | None  # None = any attempt

    def due(self, rank: int, iteration: int) -> bool:
        attempt = int(os.environ.get("HVD_MEGDET_ATTEMPT", "0"))
        return rank == self.rank and iteration == self.iteration and self.attempt in (None, attempt)

    def fire(self, log=None) -> bool:
        """Inject the fault; returns True for ``nan`` (the caller poisons its loss)."""
        if log:
            log.warning("FAULT injected: %s at iteration %d on rank %d", self.kind, self.iteration, self.rank)
            for h in log.handlers:
                h.flush()
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            return False
        if self.kind == "raise":
            raise InjectedFault(f"injected fault at iteration {self.iteration} on rank {self.rank}")
        if self.kind == "hang":
            while True:
                time.sleep(3600)
        return self.kind == "nan"


def from_env(spec: str | None = None) -> Fault | None:
    spec = os.environ.get("HVD_MEGDET_FAULT", "") if spec is None else spec
    if not spec:
        return None
    try:
        fields = dict(part.split(":", 1) for part in spec.split(","))
        fault = Fault(rank=int(fields.pop("rank")), iteration=int(fields.pop("iter")), kind=fields.pop("kind"),
                      attempt=None if fields.get("attempt", "0") == "any" else int(fields.pop("attempt", "0")))
        fields.pop("attempt", None)
    except (ValueError, KeyError) as e:
        raise ValueError(f"HVD_MEGDET_FAULT={spec!r}: expected rank:R,iter:I,kind:K[,attempt:A|any] ({e})") from None
    if fields or fault.kind not in KINDS:
        raise ValueError(f"HVD_MEGDET_FAULT={spec!r}: unknown fields {sorted(fields)} or kind (one of {KINDS})")
    return fault
