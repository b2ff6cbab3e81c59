"""torchvision Faster R-CNN with a ResNet-FPN backbone whose norm layer is the project's SyncBN.

Backbones: ``resnet50`` / ``resnet18`` (torchvision), or ``tiny`` (a 4-stage
ResNet of BasicBlocks with configurable widths, for the CPU demo). Backbone
weights: a local file, or a torchvision name (``IMAGENET1K_V1``) found in torch's hub
cache (``TORCH_HOME``), downloaded there once per node where the network allows.
Stages that are not trained (``trainable_layers < 5``) use ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import get_weight, resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet.config import Config, ModelConfig
from hvd_megdet.errors import UserError
from hvd_megdet.sync_bn import SyncBatchNorm

NORM_TYPES = (SyncBatchNorm, nn.BatchNorm2d, FrozenBatchNorm2d)


class WeightsError(UserError, ValueError):
    """model.backbone_weights cannot be resolved or loaded; the message names the file."""


# torchvision names for model.backbone_weights (ImageNet classifiers) and model.weights (detectors)
TORCHVISION_WEIGHTS = {"backbone_weights": ("IMAGENET1K_V1", {"resnet50": "ResNet50_Weights",
                                                              "resnet18": "ResNet18_Weights"}),
                       "weights": ("COCO_V1", {"resnet50": "FasterRCNN_ResNet50_FPN_Weights"})}
# the box predictor's keys: the only ones allowed to differ in shape (another number of classes)
PREDICTOR_KEYS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                  "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias")


def norm_layer(cfg: ModelConfig, bn_group_ranks: int | None):
    """``bn_group_ranks``: ranks per SyncBN group in training (plan.bn_groups); ``None`` = all ranks.
    Evaluation never communicates, so any value works there."""
    if cfg.norm == "syncbn":
        return partial(SyncBatchNorm, group_size=bn_group_ranks, impl=cfg.syncbn_impl)
    return {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}[cfg.norm]


def freeze_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (SyncBatchNorm included) by a FrozenBatchNorm2d with its weights and
    running statistics: a frozen stage must not normalise with batch statistics nor communicate."""
    if isinstance(module, _BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(module, name)
                if src is not None:
                    getattr(frozen, name).copy_(src)
        return frozen.to(module.running_mean.device if module.running_mean is not None else None)
    for name, child in module.named_children():
        new = freeze_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module


def weights_path(cfg: ModelConfig, key: str = "backbone_weights") -> tuple[Path, str | None] | None:
    """Where ``model.<key>`` (backbone_weights or weights) lives: (local path, download URL or
    None), None if unset. torchvision names resolve to torch's hub cache ($TORCH_HOME/hub)."""
    w = getattr(cfg, key)
    if not w:
        return None
    example, table = TORCHVISION_WEIGHTS[key]
    if w.upper().startswith(example.split("_")[0]):
        if cfg.backbone not in table:
            raise WeightsError(f"model.{key}={w}: torchvision has no weights for the '{cfg.backbone}' backbone "
                               f"(give a local .pth{', e.g. an hvd_megdet checkpoint' if key == 'weights' else ''})")
        try:
            weights = get_weight(f"{table[cfg.backbone]}.{w.upper()}")
        except (ValueError, KeyError, AttributeError):
            raise WeightsError(f"model.{key}={w}: not a torchvision weight of {cfg.backbone} "
                               f"(e.g. {example})") from None
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url
    return Path(w).expanduser(), None


backbone_weights_path = weights_path  # the backbone's (the default key)


def fetch_weights(cfg: ModelConfig, key: str = "backbone_weights", log=None) -> None:
    """Download torchvision-named weights into the hub cache if absent (call on one rank per
    node, then barrier). Never raises for the download: a missing file is reported by name, on
    every rank, when the weights are loaded."""
    where = weights_path(cfg, key)
    if where is None or where[1] is None or where[0].is_file():
        return
    path, url = where
    try:
        if log:
            log.info("downloading %s to %s", url, path)
        torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), map_location="cpu", progress=False)
    except Exception as e:  # offline clusters: the error at load time says where to put the file
        if log:
            log.warning("could not download %s: %s", url, e)


fetch_backbone_weights = fetch_weights


def _read_weights(cfg: ModelConfig, key: str) -> tuple[Path, dict]:
    """The state dict behind ``model.<key>``: a plain state dict, or the ``model`` entry of an
    hvd_megdet checkpoint."""
    p, url = weights_path(cfg, key)
    if not p.is_file():
        if url:
            raise WeightsError(f"model.{key}={getattr(cfg, key)}: {p} not found and could not "
                               f"be downloaded: place {url} there (torch's hub directory, $TORCH_HOME/hub)")
        raise WeightsError(f"model.{key}: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file: name it
        raise WeightsError(f"model.{key}: cannot read {p}: {type(e).__name__}: {e}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsError(f"model.{key}: {p} holds no state dict")
    return p, state


class TinyResNet(nn.Module):
    """ResNet-style body: stem (stride 4) + four stages of one BasicBlock (strides 1, 2, 2, 2)."""

    def __init__(self, widths, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = widths[0]
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2, 2))):
            down = None if s == 1 and cin == w else nn.Sequential(nn.Conv2d(cin, w, 1, stride=s, bias=False), norm(w))
            setattr(self, f"layer{i + 1}", nn.Sequential(resnet.BasicBlock(cin, w, s, down, norm_layer=norm)))
            cin = w


def _shape_mismatches(state: dict, own: dict) -> list[str]:
    """'key (file shape) vs (model shape)' for tensors both hold with different shapes
    (load_state_dict would raise a bare RuntimeError)."""
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and v.shape != own[k].shape]


def _load_backbone_weights(body: nn.Module, cfg: ModelConfig) -> None:
    p, state = _read_weights(cfg, "backbone_weights")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    shapes = _shape_mismatches(state, body.state_dict())
    if shapes:
        raise WeightsError(f"model.backbone_weights {p} does not match the backbone: {len(shapes)} shape "
                           f"mismatch(es), e.g. {shapes[:3]}")
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"model.backbone_weights {p} does not match the backbone: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_detector_weights(model: FasterRCNN, cfg: ModelConfig) -> str:
    """Fine-tuning: ``model.weights`` (an hvd_megdet checkpoint, a detector state dict, or
    torchvision's COCO_V1) into ``model``; no optimizer state or progress. A box predictor for
    another number of classes is left re-initialised; any other mismatch is a WeightsError naming
    the keys. Returns the log line."""
    p, state = _read_weights(cfg, "weights")
    own = model.state_dict()
    reinit = [k for k in PREDICTOR_KEYS if k in state and k in own and state[k].shape != own[k].shape]
    cls = PREDICTOR_KEYS[0]
    classes = (state[cls].shape[0] - 1, own[cls].shape[0] - 1) if reinit else None  # background excluded
    state = {k: v for k, v in state.items() if k not in reinit}
    shapes = _shape_mismatches(state, own)
    if shapes:
        raise WeightsError(f"model.weights {p} does not fit this model: {len(shapes)} shape mismatch(es), "
                           f"e.g. {shapes[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in reinit]
    if missing or unexpected:
        raise WeightsError(f"model.weights {p} does not fit this model: {len(missing)} missing key(s) "
                           f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    line = f"fine-tuning from model.weights={p} ({len(state)} tensors)"
    if reinit:
        line += f"; box predictor re-initialised: the weights have {classes[0]} classes, this dataset {classes[1]}"
    return line


def build_backbone(cfg: ModelConfig, bn_group_ranks: int | None = None) -> BackboneWithFPN:
    norm = norm_layer(cfg, bn_group_ranks)
    if cfg.backbone == "tiny":
        body = TinyResNet(cfg.tiny_widths, norm)
        if cfg.backbone_weights:
            _load_backbone_weights(body, cfg)
        return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, list(cfg.tiny_widths),
                               cfg.fpn_channels)
    backbone = resnet_fpn_backbone(backbone_name=cfg.backbone, weights=None, norm_layer=norm,
                                   trainable_layers=cfg.trainable_layers)
    if cfg.backbone_weights:
        _load_backbone_weights(backbone.body, cfg)
    for name, child in list(backbone.body.named_children()):  # stages torchvision froze (trainable_layers < 5)
        if not any(p.requires_grad for p in child.parameters()):
            setattr(backbone.body, name, freeze_norms(child))
    if cfg.fpn_channels != backbone.out_channels:
        raise ValueError(f"model.fpn_channels={cfg.fpn_channels}: torchvision's {cfg.backbone} FPN has "
                         f"{backbone.out_channels} channels")
    return backbone


def build_model(cfg: Config, num_classes: int, bn_group_ranks: int | None = None) -> FasterRCNN:
    m, d = cfg.model, cfg.data
    backbone = build_backbone(m, bn_group_ranks)
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes), ((0.5, 1.0, 2.0),) * len(m.anchor_sizes))
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, m.representation_size)
    return FasterRCNN(
        backbone, num_classes=None, min_size=d.min_size, max_size=d.max_size,
        rpn_anchor_generator=anchors, box_head=box_head,
        box_predictor=FastRCNNPredictor(m.representation_size, num_classes),
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image, box_batch_size_per_image=m.box_batch_size_per_image,
        box_detections_per_img=m.box_detections_per_img)


def describe_norms(model: nn.Module) -> str:
    """What normalisation the model holds, e.g. 'SyncBatchNorm(group_size=16, plain) x53' — logged at start."""
    counts = Counter()
    for mod in model.modules():
        if isinstance(mod, SyncBatchNorm):
            counts[f"SyncBatchNorm(group_size={mod.group_size or 'all'}, {mod.impl})"] += 1
        elif isinstance(mod, NORM_TYPES):
            counts[type(mod).__name__] += 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "no normalisation layers"
