"""Failure classes and the exit codes that tell launchers what happened (README "Failures").

| code | meaning                                   | launcher (slurm/megdet.sbatch, scripts/run.py) |
|------|-------------------------------------------|------------------------------------------------|
| 0    | done                                      | stop                                           |
| 75   | preempted: stopped on a signal, checkpointed | requeue / stop (resume with --resume)       |
| 2    | user error: config, data, weights, paths  | stop: no restart can fix it                    |
| 1    | crash: anything else (a dead peer, CUDA/NCCL, non-finite loss, a bug) | restart from the newest checkpoint, up to a budget |

A rank that fails also writes ``<HVD_MEGDET_STATUS_DIR>/<class>-rank-NNNNN.json`` (rank, host,
time, reason) when its launcher sets that folder, so the launcher can classify the attempt and
name the first failing rank even where the launcher's own exit code is lost (srun kills the
other ranks of a step as soon as one exits).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL


class UserError(Exception):
    """Bad input (config, data, weights, paths): the message names it; no restart can fix it."""


def write_status(kind: str, reason: str, rank: int, size: int) -> None:
    """``$HVD_MEGDET_STATUS_DIR/<kind>-rank-NNNNN.json`` for the launcher (job script, scripts/run.py).
    Rank and size are the caller's: this module imports nothing of the package (launchers use it
    without loading horovod)."""
    folder = os.environ.get("HVD_MEGDET_STATUS_DIR")
    if not folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        rec = {"class": kind, "rank": rank, "size": size, "host": socket.gethostname(),
               "pid": os.getpid(), "time": time.time(), "reason": reason[:2000]}
        path = Path(folder, f"{kind}-rank-{rank:05d}.json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)  # a rank killed mid-write leaves no half file
    except OSError:
        pass  # the exit code still says it
