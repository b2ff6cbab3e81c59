"""Ends a rank that makes no progress, so that a hang (a stuck GPU, filesystem or process on
some rank) ends the job within a bounded time and its launcher can restart it.

Horovod's own stall shutdown (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) did not fire here for a rank
that stops submitting collectives (0.28.1, Gloo and MPI, response cache on or off), so the
trainer keeps its own clock: the engine calls ``beat(phase)`` as it goes; if no beat comes for
``timeout`` seconds, the watchdog logs where this rank is — inside a collective (waiting for a
peer) or outside any (this rank is the stuck one) — writes its status file and exits with the
crash code. Every rank runs one, so the hung rank and the ranks waiting for it all end, and the
launcher tears down the rest. Paused around evaluation and checkpoints, where rank 0 legitimately
works alone for minutes.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time
from contextlib import contextmanager

from hvd_megdet import dist
from hvd_megdet.errors import EXIT_CRASH


class Watchdog:
    def __init__(self, timeout_s: float, log, on_stall=None):
        self.timeout_s, self.log, self.on_stall = timeout_s, log, on_stall
        self.phase, self.iteration = "start", 0
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="hvd_megdet-watchdog", daemon=True)
            self._thread.start()

    def beat(self, phase: str, iteration: int | None = None) -> None:
        self.phase = phase
        if iteration is not None:
            self.iteration = iteration
        self._last = time.monotonic()

    @contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if self._paused or idle < self.timeout_s:
                continue
            # the log or status write may block too (a stuck filesystem is one of the hangs): exit anyway
            threading.Timer(30, os._exit, (EXIT_CRASH,)).start()
            where = dist.current_collective()
            reason = (f"no progress for {idle:.0f} s at iteration {self.iteration} ({self.phase}): " +
                      (f"waiting in collective '{where}' for a peer that is stuck" if where else
                       "stuck outside any collective: this rank is the one that hangs"))
            self.log.error("watchdog: %s; ending this rank so that the job ends (stacks on stderr)", reason)
            for h in self.log.handlers:
                h.flush()
            faulthandler.dump_traceback(all_threads=True)  # where every thread is stuck
            if self.on_stall:
                self.on_stall(reason)
            os._exit(EXIT_CRASH)
