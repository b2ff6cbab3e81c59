"""Per-rank logging: every rank writes ``<out>/logs/rank-NNNNN.log``; rank 0 also prints.

Each record carries timestamp, rank, host and pid, so logs of a 128-rank job can
be concatenated and sorted. The first lines of each rank's log describe the rank
(size, local rank, host, device, controller) and the versions of the stack.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

LOGGER_NAME = "hvd_megdet"
_FORMAT = "%(asctime)s rank=%(rank)05d host=%(host)s pid=%(process)d %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.host = rank, socket.gethostname()

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.host = self.rank, self.host
        return True


def rank_log_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / "logs" / f"rank-{rank:05d}.log"


def setup(output_dir: str | os.PathLike, rank: int, console: bool | None = None,
          level: int = logging.INFO) -> logging.Logger:
    """Configure the ``hvd_megdet`` logger for this rank (replacing earlier handlers)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    path = rank_log_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, mode="a")]
    if console if console is not None else rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    fmt = logging.Formatter(_FORMAT)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RankFilter(rank))
        logger.addHandler(h)
    return logger


def log_environment(logger: logging.Logger, env: dict) -> None:
    """The head of a rank's log: who this rank is and what it runs on."""
    logger.info("rank %(rank)d of %(size)d (local rank %(local_rank)d of %(local_size)d) on %(host)s "
                "pid %(pid)d controller %(controller)s threads %(threads)d", env)
    logger.info("versions: torch %(torch)s torchvision %(torchvision)s horovod %(horovod)s "
                "cuda %(cuda)s mpi %(mpi)s", env)


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")
