"""What every rank does before the first iteration that needs the others, shared by training,
evaluation and prediction: the device agreed, the data set generated and the weights downloaded
once per node, weights and image files checked with ONE answer shared by all ranks (so that a
missing file fails every rank alike instead of one), the model built and made identical.

:func:`build` issues its collectives in one fixed order on every rank; that order is the contract
(a rank that skipped one would pair its next collective with another rank's, or hang):

1. ``devices``               allgather  every rank's host, GPU and problem (device.select_device)
2. ``data_ready``            barrier    after local rank 0 of each node prepared data and weights
3. ``backbone_weights``      allgather  the backbone weights file present on every node
4. ``image_check_<file>``    broadcast  rank 0's check that the val images exist
5. ``detector_weights``      broadcast  rank 0's verdict on ``model.weights`` (only when set)
6. ``broadcast_parameters``  broadcast  rank 0's weights to every rank
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from hvd_megdet import data, dist, rng
from hvd_megdet.config import Config, ConfigError, ModelConfig
from hvd_megdet.device import describe_device, select_device
from hvd_megdet.model import WeightsError, build_model, fetch_weights, load_detector_weights as _load, weights_path


def choose_device(cfg: Config, log) -> torch.device:
    """``train.device`` agreed by every rank (collective 1), logged; ``train.threads_per_rank``."""
    dev = select_device(cfg.train.device)  # a missing GPU fails here, before any other collective
    log.info("device: %s", describe_device(dev))
    if cfg.train.threads_per_rank:
        torch.set_num_threads(cfg.train.threads_per_rank)
    return dev


@dataclass
class Ready:
    device: torch.device
    val_ds: data.CocoDetection
    model: torch.nn.Module


def build(cfg: Config, log, bn_group_ranks: int | None = None) -> Ready:
    """The model on this rank's device, identical on every rank, and the val set (collectives 1-6
    in the module's order). ``bn_group_ranks``: the training BN groups (None for evaluation).
    Leaves the RNG seeded per rank (RPN/ROI sampling; saved in checkpoints)."""
    dev = choose_device(cfg, log)
    if bn_group_ranks is not None and cfg.model.norm == "syncbn" and cfg.model.syncbn_impl == "fused" \
            and dev.type != "cuda":  # training only: evaluation never reaches the fused path
        # every rank agreed on the device: every rank raises this alike
        raise ConfigError(f"model.syncbn_impl=fused needs a CUDA device (torch's fused BatchNorm kernels have no "
                          f"{dev.type} implementation); this job runs on {dev.type}: use model.syncbn_impl=plain")
    rng.seed_all(cfg.train.seed)  # identical initialisation everywhere (then broadcast anyway)
    prepare_data_and_weights(cfg, log)
    val_ds = data.val_dataset(cfg.data)
    check_image_files(val_ds)
    model = build_model(cfg, val_ds.num_classes, bn_group_ranks)
    load_detector_weights(model, cfg.model, log)
    model.to(dev)
    rng.seed_all(cfg.train.seed, dist.rank())
    dist.broadcast_parameters(model.state_dict())  # every rank starts from rank 0's weights
    return Ready(dev, val_ds, model)


def prepare_data_and_weights(cfg: Config, log) -> None:
    """One rank per node generates data / downloads weights; every rank then checks the backbone
    weights file on its own node (TORCH_HOME may be node-local). Detector weights (model.weights)
    are read by rank 0 only (then broadcast with the parameters)."""
    weights = weights_path(cfg.model, "backbone_weights")  # a bad name fails here, on every rank alike
    weights_path(cfg.model, "weights")
    if dist.local_rank() == 0:
        data.prepare(cfg.data, log)
        fetch_weights(cfg.model, "backbone_weights", log)
        if dist.is_main():
            fetch_weights(cfg.model, "weights", log)
    dist.barrier(name="data_ready")
    if weights:
        missing = {h for h, ok in dist.allgather_object((socket.gethostname(), weights[0].is_file()),
                                                        name="backbone_weights") if not ok}
        if missing:
            raise WeightsError(
                f"model.backbone_weights={cfg.model.backbone_weights}: {weights[0]} not found on {sorted(missing)}"
                + (f" and could not be downloaded: place {weights[1]} there" if weights[1] else ""))
    if dist.is_main() and cfg.model.backbone == "resnet50" and not (cfg.model.backbone_weights or cfg.model.weights):
        log.warning("model.backbone_weights is empty: the backbone starts from random weights, not the "
                    "paper's recipe (ImageNet-pretrained ResNet-50): set model.backbone_weights=IMAGENET1K_V1")


def load_detector_weights(model, cfg: ModelConfig, log) -> None:
    """``model.weights`` (fine-tuning): rank 0 loads the file into ``model`` (call before the
    parameter broadcast); its verdict reaches every rank, so a bad file fails the job everywhere."""
    if not cfg.weights:
        return
    info = dist.root_decides(
        lambda: _load(model, cfg), "detector_weights", WeightsError,
        describe=lambda e: str(e) if isinstance(e, WeightsError) else
        f"model.weights={cfg.weights}: cannot load: {type(e).__name__}: {e}")
    log.info("%s", info)


def check_image_files(ds) -> None:
    """Rank 0 checks that every image file exists (threads); every rank raises the same error.
    Per-rank startup stays at parsing the annotation file (128 ranks x 118k stats avoided)."""
    def check() -> None:
        problem = ds.missing_files()
        if problem:
            raise data.DataError(problem)
    dist.root_decides(check, f"image_check_{ds.ann_file.name}", data.DataError, catch=(data.DataError,))
