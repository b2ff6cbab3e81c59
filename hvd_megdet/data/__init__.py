"""Datasets and loaders built from the config (COCO files or the generated shapes set)."""
from __future__ import annotations

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
        return shapes.default_root(cfg.shapes_train, cfg.shapes_val, cfg.shapes_image_size, cfg.shapes_seed)
    return Path(cfg.root).expanduser()


def prepare(cfg: DataConfig, log=None) -> Path:
    """Create the shapes set if needed (call on one rank per node, then barrier)."""
    root = dataset_root(cfg)
    if cfg.dataset == "shapes":
        shapes.ensure(root, cfg.shapes_train, cfg.shapes_val, cfg.shapes_image_size, cfg.shapes_seed, log)
    return root


def train_dataset(cfg: DataConfig) -> CocoDetection:
    root = dataset_root(cfg)
    return CocoDetection(root / cfg.train_images, root / cfg.train_annotations, train=True,
                         transform=TrainTransform(cfg.hflip_prob))


def val_dataset(cfg: DataConfig) -> CocoDetection:
    root = dataset_root(cfg)
    return CocoDetection(root / cfg.val_images, root / cfg.val_annotations, train=False,
                         transform=EvalTransform())


def train_loader(dataset: CocoDetection, cfg: DataConfig, batch_size: int, rank: int, size: int,
                 seed: int, start_images: int) -> torch.utils.data.DataLoader:
    """Endless loader from stream position ``start_images`` (images seen, all ranks together)."""
    sampler = DistributedGroupedBatchSampler(dataset.aspect_ratios(), batch_size, rank, size, seed,
                                             cfg.aspect_ratio_grouping, start_images)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
        persistent_workers=cfg.workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=signals.ignore_in_worker,  # SIGTERM to every process must not kill the workers
        generator=torch.Generator().manual_seed(seed))  # own generator: the global RNG stays untouched
