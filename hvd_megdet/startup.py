"""What every rank does before the first iteration that needs the others: the data set
generated and the weights downloaded once per node, weights and image files checked with ONE
answer shared by all ranks, so that a missing file fails every rank alike instead of one."""
from __future__ import annotations

import socket

from hvd_megdet import data, dist
from hvd_megdet.config import Config, ModelConfig
from hvd_megdet.model import WeightsError, fetch_weights, load_detector_weights as _load, weights_path


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
    dist.barrier()
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
    verdict = None
    if dist.is_main():
        try:
            verdict = {"info": _load(model, cfg)}
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear it, not hang
            verdict = {"error": str(e) if isinstance(e, WeightsError) else
                       f"model.weights={cfg.weights}: cannot load: {type(e).__name__}: {e}"}
    verdict = dist.broadcast_object(verdict, name="detector_weights")
    if "error" in verdict:
        raise WeightsError(verdict["error"])
    log.info("%s", verdict["info"])


def check_image_files(ds) -> None:
    """Rank 0 checks that every image file exists (threads); every rank raises the same error.
    Per-rank startup stays at parsing the annotation file (128 ranks x 118k stats avoided)."""
    problem = ds.missing_files() if dist.is_main() else None
    problem = dist.broadcast_object(problem, name=f"image_check_{ds.ann_file.name}")
    if problem:
        raise data.DataError(problem)
