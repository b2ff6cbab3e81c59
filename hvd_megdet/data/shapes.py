"""The embedded "shapes" detection set, written in the COCO layout and read back through pycocotools.

``root/train/*.jpg``, ``root/val/*.jpg``, ``root/annotations/instances_{train,val}.json``.
Three classes (rectangle, ellipse, triangle), 1-6 objects per image from COCO
"small" (< 32² px) to "large" (> 96² px), overlaps allowed, on a textured noisy background.
Deterministic by seed; generated once into a cache folder (atomically) and reused. Square images of
``size`` px, or ``size`` high and ``width`` wide (COCO's 800 x ~1216 once resized, for GPU timings).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("rectangle", "ellipse", "triangle")
VERSION = 2  # bump when the generator changes: it is part of the cache folder name


def default_root(n_train: int, n_val: int, size: int, seed: int, width: int = 0) -> Path:
    base = Path(os.environ.get("HVD_MEGDET_CACHE", Path.home() / ".cache" / "hvd_megdet"))
    shape = f"{size}x{width}px" if width and width != size else f"{size}px"
    return base / f"shapes-v{VERSION}-{n_train}-{n_val}-{shape}-seed{seed}"


def _background(rng: np.random.RandomState, size: int, width: int) -> np.ndarray:
    """Smooth colour gradient + blocky low-frequency texture + pixel noise (``size`` x ``width``)."""
    yy, xx = np.mgrid[0:size, 0:width] / max(size, width)
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
    blocks = rng.uniform(-20, 20, (8, 8, 3)).repeat(size // 8 + 1, 0).repeat(width // 8 + 1, 1)[:size, :width]
    img = img + blocks + rng.normal(0, 8, (size, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_image(rng: np.random.RandomState, size: int, width: int):
    img = Image.fromarray(_background(rng, size, width))
    draw = ImageDraw.Draw(img)
    # Sizes log-uniform from 10 px to 7/8 of the image: COCO small, medium and (a few) large.
    # Drawn largest first, so that small objects stay visible on top of large ones.
    n = rng.randint(1, 7)
    short = min(size, width)
    sides = np.exp(rng.uniform(np.log(10), np.log(short * 7 / 8), n))
    aspects = np.exp(rng.uniform(np.log(0.7), np.log(1.4), n))
    objects = []
    for side, aspect in sorted(zip(sides, aspects), reverse=True):
        cls = rng.randint(len(CLASSES))
        w = int(np.clip(round(side * aspect ** 0.5), 8, width))
        h = int(np.clip(round(side / aspect ** 0.5), 8, size))
        x0, y0 = int(rng.randint(0, width - w + 1)), int(rng.randint(0, size - h + 1))
        color = tuple(int(v) for v in rng.randint(0, 256, 3))
        box = [x0, y0, x0 + w - 1, y0 + h - 1]
        if cls == 0:
            draw.rectangle(box, fill=color)
        elif cls == 1:
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(x0 + w / 2, y0), (x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1)], fill=color)
        objects.append((cls, [float(x0), float(y0), float(w), float(h)]))
    return img, objects


def _write_split(root: Path, split: str, n: int, size: int, seed: int, width: int) -> None:
    rng = np.random.RandomState(seed)
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        img, objects = _draw_image(rng, size, width)
        name = f"{i:06d}.jpg"
        img.save(root / split / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": size})
        for cls, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    coco = {"info": {"description": f"hvd_megdet shapes v{VERSION} seed {seed}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def ensure(root: str | os.PathLike, n_train: int, n_val: int, size: int, seed: int, log=None,
           width: int = 0) -> Path:
    """Generate the set into ``root`` unless it is already complete there. Safe to race."""
    root, width = Path(root), width or size
    if (root / "annotations" / "instances_val.json").is_file():
        return root
    if log:
        log.info("generating the shapes dataset (%d train + %d val, %d px) into %s", n_train, n_val, size, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        _write_split(tmp, "train", n_train, size, seed, width)
        _write_split(tmp, "val", n_val, size, seed + 1_000_003, width)
        try:
            os.rename(tmp, root)  # atomic: readers see all or nothing
        except OSError:
            if not (root / "annotations" / "instances_val.json").is_file():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
