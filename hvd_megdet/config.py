"""Typed configuration: dataclasses + YAML files in ``hvd_megdet/configs/`` + ``key=value`` overrides.

OmegaConf structured configs do the merging and reject unknown keys and wrong
types with the key's name; :func:`validate` checks values. A YAML file may name
another config to start from with a top-level ``base: NAME``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hvd_megdet.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "shapes_tiny"


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "coco"                 # "coco" (files under root) or "shapes" (generated into root)
    root: str = "data/coco"               # for shapes: "" = ~/.cache/hvd_megdet/shapes-<params>
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    min_size: int = 800                   # shorter side after resize
    max_size: int = 1333                  # longer side cap
    hflip_prob: float = 0.5
    aspect_ratio_grouping: bool = True
    workers: int = 2                      # DataLoader worker processes per rank
    # the embedded shapes set (dataset: shapes)
    shapes_train: int = 800
    shapes_val: int = 100
    shapes_image_size: int = 128          # px (height; and width unless shapes_width)
    shapes_width: int = 0                 # px; 0 = square images
    shapes_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"            # resnet50 | resnet18 | tiny
    tiny_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    fpn_channels: int = 256
    norm: str = "syncbn"                  # syncbn | bn (local) | frozen (torchvision's FrozenBatchNorm2d)
    # BN size, set one of the two (neither = the whole world): in images, MegDet's unit (32 is the
    # paper's best; groups of bn_size / images_per_rank ranks, the whole world where it has fewer),
    # or in ranks (must divide the world size).
    bn_size: int = 0                      # images per BN statistic; 0 = not set
    bn_group_size: int = 0                # ranks per BN group; 0 = not set
    syncbn_impl: str = "plain"            # plain (any device) | fused (CUDA only: torch's fused BN kernels,
                                          # fewer passes over the activations; not yet validated on a GPU)
    trainable_layers: int = 5             # backbone stages trained (5 = all, as MegDet); frozen ones use
                                          # FrozenBatchNorm2d
    backbone_weights: str = ""            # "" = random init, a local .pth of an ImageNet ResNet, or a
                                          # torchvision name (IMAGENET1K_V1, IMAGENET1K_V2) from TORCH_HOME
    weights: str = ""                     # fine-tuning: the whole detector's weights, "" = none: an
                                          # hvd_megdet checkpoint, a detector state dict, or COCO_V1
                                          # (torchvision's fasterrcnn_resnet50_fpn, from TORCH_HOME);
                                          # another number of classes re-initialises the box predictor
    representation_size: int = 1024       # box head MLP width
    box_detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])


@dataclass(frozen=True)
class SolverConfig:
    images_per_rank: int = 2
    base_lr: float = 0.02                 # for reference_batch images; scaled linearly by global batch
    reference_batch: int = 16             # the batch that base_lr, max_iter and steps are given for
    scale_schedule: bool = True           # max_iter/steps x reference_batch / global batch
    max_iter: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0        # on BN weights/biases
    clip_grad_norm: float = 0.0           # 0 = off
    fp16_allreduce: bool = False          # Horovod fp16 gradient compression
    backward_passes_per_step: int = 1
    amp: bool = False                     # autocast on CUDA


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    log_period: int = 20
    # periods are iterations at solver.reference_batch (i.e. images / reference_batch), like max_iter
    checkpoint_period: int = 5000
    checkpoint_minutes: float = 30.0      # also checkpoint when this much time passed since the last one; 0 = off
    stall_minutes: float = 10.0           # end this rank after so long without progress (a hang); 0 = off
    keep_checkpoints: int = 3
    eval_period: int = 0                  # 0 = only at the end
    eval_images: int = 0                  # 0 = the whole val set
    num_visualizations: int = 8
    threads_per_rank: int = 0             # torch threads on CPU; 0 = leave torch's default
    timeline: str = ""                    # Horovod timeline file (Chrome trace, written by rank 0); a relative
                                          # path is in the output dir; "" = off (README "Horovod timeline")
    device: str = "auto"                  # auto (CUDA when usable) | cuda (else a user error) | cpu


@dataclass(frozen=True)
class Config:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown config '{name_or_path}': choose one of {available()} or give a .yaml path")
    return p


def _load_yaml(name_or_path: str, seen: tuple = ()):
    path = _find(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"config 'base' cycle: {' -> '.join(seen + (str(path),))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"cannot read config {path}: {e}") from None
    base = node.pop("base", None)
    layers = _load_yaml(str(base), seen + (str(path),)) if base else []
    return layers + [(path, node)]


def load(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] = ()) -> Config:
    """Resolve a config: dataclass defaults <- base YAMLs <- YAML <- ``key=value`` overrides."""
    merged = OmegaConf.structured(Config)
    for path, node in _load_yaml(name_or_path):
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command-line override: {_describe(e)}") from None
    if not merged.name:
        merged = OmegaConf.merge(merged, {"name": _find(name_or_path).stem})
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def validate(cfg: Config) -> None:
    """Value checks the types cannot express; raises ConfigError naming the key."""
    d, m, s, t = cfg.data, cfg.model, cfg.solver, cfg.train
    checks = [
        ("data.dataset", d.dataset in ("coco", "shapes"), "must be 'coco' or 'shapes'"),
        ("data.min_size", d.min_size > 0, "must be > 0"),
        ("data.max_size", d.max_size >= d.min_size, "must be >= data.min_size"),
        ("data.hflip_prob", 0.0 <= d.hflip_prob <= 1.0, "must be in [0, 1]"),
        ("data.workers", d.workers >= 0, "must be >= 0"),
        ("data.shapes_train", d.shapes_train > 0, "must be > 0"),
        ("data.shapes_val", d.shapes_val > 0, "must be > 0"),
        ("data.shapes_image_size", d.shapes_image_size >= 64, "must be >= 64"),
        ("data.shapes_width", d.shapes_width == 0 or d.shapes_width >= 64, "must be 0 (square) or >= 64"),
        ("model.backbone", m.backbone in ("resnet50", "resnet18", "tiny"), "must be resnet50, resnet18 or tiny"),
        ("model.norm", m.norm in ("syncbn", "bn", "frozen"), "must be syncbn, bn or frozen"),
        ("model.bn_group_size", m.bn_group_size >= 0, "must be >= 0 (0 = not set)"),
        ("model.syncbn_impl", m.syncbn_impl in ("plain", "fused"), "must be plain or fused"),
        ("model.bn_size", m.bn_size >= 0, "must be >= 0 (0 = not set)"),
        ("model.bn_size", not (m.bn_size and m.bn_group_size),
         f"set either model.bn_size (images) or model.bn_group_size (ranks), not both "
         f"(model.bn_group_size = {m.bn_group_size}; unset one with =0)"),
        ("model.bn_size", s.images_per_rank <= 0 or m.bn_size % s.images_per_rank == 0,
         f"must be a multiple of solver.images_per_rank = {s.images_per_rank}"),
        ("model.trainable_layers", 0 <= m.trainable_layers <= 5, "must be in [0, 5]"),
        ("model.tiny_widths", len(m.tiny_widths) == 4 and all(w > 0 for w in m.tiny_widths),
         "must be 4 positive widths"),
        ("model.fpn_channels", m.fpn_channels > 0, "must be > 0"),
        ("model.anchor_sizes", len(m.anchor_sizes) == 5, "must have 5 sizes (one per FPN level)"),
        ("solver.images_per_rank", s.images_per_rank > 0, "must be > 0"),
        ("solver.base_lr", s.base_lr > 0, "must be > 0"),
        ("solver.reference_batch", s.reference_batch > 0, "must be > 0"),
        ("solver.max_iter", s.max_iter > 0, "must be > 0"),
        ("solver.steps", list(s.steps) == sorted(s.steps) and all(0 < x < s.max_iter for x in s.steps),
         "must be increasing and inside (0, max_iter)"),
        ("solver.gamma", 0 < s.gamma <= 1, "must be in (0, 1]"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "must be >= 0"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "must be in (0, 1]"),
        ("solver.momentum", 0 <= s.momentum < 1, "must be in [0, 1)"),
        ("solver.weight_decay", s.weight_decay >= 0, "must be >= 0"),
        ("solver.clip_grad_norm", s.clip_grad_norm >= 0, "must be >= 0"),
        ("solver.backward_passes_per_step", s.backward_passes_per_step >= 1, "must be >= 1"),
        # Refused rather than fixed: hvd.DistributedOptimizer allreduces each gradient in a hook during
        # backward, i.e. the LOSS-SCALED gradient (x 2^16 at first), before scaler.unscale_ can run; in
        # fp16 (max 65504, and summed over all ranks before the average) it overflows, the GradScaler
        # skips the step and halves its scale, again and again. A correct design would divide by the
        # scale inside a scaler-aware Compression (and multiply back after), coupling optimizer and
        # scaler for a bandwidth gain the fusion buffer mostly gives already.
        ("solver.amp", not (s.amp and s.fp16_allreduce),
         "cannot be combined with solver.fp16_allreduce=true: Horovod would compress the loss-scaled "
         "gradients to fp16, where they overflow and the AMP GradScaler skips steps and lowers its scale "
         "without end; keep solver.amp=true with solver.fp16_allreduce=false, or set solver.amp=false "
         "to keep the fp16 allreduce"),
        ("train.log_period", t.log_period > 0, "must be > 0"),
        ("train.checkpoint_period", t.checkpoint_period > 0, "must be > 0"),
        ("train.checkpoint_minutes", t.checkpoint_minutes >= 0, "must be >= 0 (0 = off)"),
        ("train.stall_minutes", t.stall_minutes >= 0, "must be >= 0 (0 = off)"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, "must be >= 1"),
        ("train.eval_period", t.eval_period >= 0, "must be >= 0"),
        ("train.eval_images", t.eval_images >= 0, "must be >= 0"),
        ("train.threads_per_rank", t.threads_per_rank >= 0, "must be >= 0"),
        ("train.device", t.device in ("auto", "cuda", "cpu"), "must be auto, cuda or cpu"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: {why}")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, overrides: list[str] = ()) -> Config:
    """Rebuild a Config saved with :func:`to_dict` (e.g. from a checkpoint), with overrides."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), d, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"saved config: {_describe(e)}") from None
    validate(cfg)
    return cfg
