"""The stop request: SIGUSR1 / SIGTERM (SLURM's warning before a time limit, preemption,
``scancel``) set a flag that the training loop reads once per iteration and shares with every
rank through its one allreduce. Signal handlers belong to the process, hence one flag per process,
installed as early as possible (``app.run``) so a signal during start-up is not lost.
DataLoader workers ignore both signals (``ignore_in_worker``): a signal sent to every process
of a job must reach the trainer, not kill its data workers.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self):
        self.signum = 0
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


_flag: StopFlag | None = None


def stop_flag() -> StopFlag:
    """This process's flag (handlers installed on first call)."""
    global _flag
    if _flag is None:
        _flag = StopFlag()
    return _flag


def ignore_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
