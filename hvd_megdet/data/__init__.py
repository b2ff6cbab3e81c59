"""Datasets and loaders built from the config (COCO files or the generated shapes set)."""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
from pathlib import Path

import torch

from hvd_megdet import signals
from hvd_megdet.config import DataConfig
from hvd_megdet.data import shapes
from hvd_megdet.data.coco import CocoDetection, DataError, collate
from hvd_megdet.data.sampler import DatasetTooSmall, DistributedGroupedBatchSampler
from hvd_megdet.data.transforms import EvalTransform, TrainTransform

__all__ = ["CocoDetection", "DataError", "DatasetTooSmall", "dataset_root", "prepare", "train_dataset",
           "val_dataset", "train_loader"]


def dataset_root(cfg: DataConfig) -> Path:
    if cfg.dataset == "shapes" and not cfg.root:
        return shapes.default_root(cfg.shapes_train, cfg.shapes_val, cfg.shapes_image_size, cfg.shapes_seed,
                                   cfg.shapes_width)
    return Path(cfg.root).expanduser()


def prepare(cfg: DataConfig, log=None) -> Path:
    """Create the shapes set if needed (call on one rank per node, then barrier)."""
    root = dataset_root(cfg)
    if cfg.dataset == "shapes":
        shapes.ensure(root, cfg.shapes_train, cfg.shapes_val, cfg.shapes_image_size, cfg.shapes_seed, log,
                      cfg.shapes_width)
    return root


def train_dataset(cfg: DataConfig) -> CocoDetection:
    root = dataset_root(cfg)
    return CocoDetection(root / cfg.train_images, root / cfg.train_annotations, train=True,
                         transform=TrainTransform(cfg.hflip_prob))


def val_dataset(cfg: DataConfig) -> CocoDetection:
    root = dataset_root(cfg)
    return CocoDetection(root / cfg.val_images, root / cfg.val_annotations, train=False,
                         transform=EvalTransform())


def worker_start_method(workers: int, size: int) -> str | None:
    """How DataLoader workers start: not by a plain fork of a rank that runs Horovod with peers.
    Such a rank holds MPI/NCCL state (InfiniBand verbs pin and register its memory; a forked child's
    copy-on-write of those pages is undefined on stacks without fork support), so the workers are
    forked from a clean forkserver process (Horovod's own examples do the same), or spawned where
    there is no forkserver. Either way the dataset is pickled to each worker (once: persistent
    workers) and each worker re-imports the main module as ``__mp_main__`` (so entry points need their
    ``if __name__ == "__main__"`` guard; scripts/train.py's top-level stop flag then covers the worker
    until ``signals.ignore_in_worker`` runs). The forkserver preloads this package (torch, PIL,
    pycocotools), so a worker forks with them imported instead of importing them again; see
    ``_start_forkserver`` and ``_worker_init`` for the stop signals and a trainer that crashed.
    One process (size 1) has no peers: plain fork, as before."""
    if workers == 0 or size == 1:
        return None
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _start_forkserver() -> None:
    """Start this process's forkserver (preloading this package) with the stop signals blocked: the
    forkserver and every worker it forks inherit the mask, so a signal sent to every process of the
    job cannot kill a worker that is still starting, before ``worker_init_fn`` ignores it (a plain
    fork inherited the trainer's handlers; a forkserver's child inherits the forkserver's). Blocked,
    not ignored, here: a signal that comes meanwhile reaches the trainer's stop flag when unblocked.
    (CPython does the same for its resource tracker, bpo-33613; started first, as starting it
    unblocks SIGTERM on its way out.)"""
    multiprocessing.forkserver.set_forkserver_preload([__name__])
    multiprocessing.resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()  # once per process; a no-op afterwards
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(trainer_pid: int, worker_id: int) -> None:
    """``worker_init_fn``: ignore the stop signals (``signals.ignore_in_worker``) and, in a worker
    forked from a forkserver, end the worker when the trainer is gone. torch's workers watch their
    parent, which is then the forkserver; and the forkserver lives as long as its children do (each
    holds its liveness pipe), so a trainer that died without shutting its loader down (a crash:
    ``os._exit``, SIGKILL) would leave both behind, holding the dataset's memory, for ever."""
    signals.ignore_in_worker(worker_id)
    started = _process_start(trainer_pid)
    if os.getppid() != trainer_pid and started:
        threading.Thread(target=_exit_without, args=(trainer_pid, started), name="trainer-watch",
                         daemon=True).start()


def _process_start(pid: int) -> str | None:
    """Process ``pid``'s start time (Linux /proc), or None when it is gone: ended (also a zombie
    whose parent has not reaped it yet) or no /proc to tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state is field 3, starttime 22
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _exit_without(pid: int, started: str, poll_s: float = 1.0) -> None:
    """End this process once process ``pid`` (started at ``started``: a reused pid is not it) is gone."""
    while _process_start(pid) == started:
        time.sleep(poll_s)
    os._exit(0)


def train_loader(dataset: CocoDetection, cfg: DataConfig, batch_size: int, rank: int, size: int,
                 seed: int, start_images: int) -> torch.utils.data.DataLoader:
    """Endless loader from stream position ``start_images`` (images seen, all ranks together)."""
    sampler = DistributedGroupedBatchSampler(dataset.aspect_ratios(), batch_size, rank, size, seed,
                                             cfg.aspect_ratio_grouping, start_images)
    method = worker_start_method(cfg.workers, size)
    context = multiprocessing.get_context(method) if method else None
    if method == "forkserver":
        _start_forkserver()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
        persistent_workers=cfg.workers > 0, pin_memory=torch.cuda.is_available(),
        multiprocessing_context=context,
        # SIGTERM to every process must not kill the workers; nor may a dead trainer leave them behind
        worker_init_fn=functools.partial(_worker_init, os.getpid()),
        generator=torch.Generator().manual_seed(seed))  # own generator: the global RNG stays untouched
