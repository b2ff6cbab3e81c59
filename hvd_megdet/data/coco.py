"""COCO instances read with pycocotools (the real COCO 2017 layout, or the shapes set in the same layout).

Crowd boxes and degenerate boxes (width or height < 1 px after clipping) are
dropped from training targets; training keeps only images with at least one box
left. Category ids are mapped to contiguous labels 1..K (0 is background for
torchvision's Faster R-CNN) and back for evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from hvd_megdet.errors import UserError


class DataError(UserError, ValueError):
    """Bad or missing dataset files; the message names the file."""


def load_coco(ann_file: str | os.PathLike) -> COCO:
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file is not valid JSON: {ann_file}: {e}") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise DataError(f"annotation file is not in COCO instances format: {ann_file}: {e!r}") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise DataError(f"annotation file has no '{key}' list: {ann_file}")
    return coco


def valid_boxes(anns: list[dict], width: int, height: int):
    """xyxy boxes and category ids of the non-crowd annotations with positive clipped size."""
    boxes, cats = [], []
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            boxes.append([x0, y0, x1, y1])
            cats.append(a["category_id"])
    return boxes, cats


class CocoDetection(torch.utils.data.Dataset):
    """Items are ``(image_tensor, target)``; indexed by ``(index, flip_seed)`` pairs from the sampler."""

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, train: bool,
                 transform=None):
        self.image_dir = Path(image_dir)
        self.coco = load_coco(ann_file)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DataError(f"annotation file has no categories: {ann_file}")
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.cat_to_label = {c: i for i, c in self.label_to_cat.items()}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.imgs)
        if train:  # as torchvision's reference: train only on images with a usable box
            ids = [i for i in ids if valid_boxes(self.coco.imgToAnns.get(i, []),
                                                 self.coco.imgs[i]["width"], self.coco.imgs[i]["height"])[0]]
        self.ids = ids

    def missing_files(self, threads: int = 32) -> str | None:
        """Why the image files are unusable (folder or files missing), or None. Stats every file,
        in ``threads`` threads (a shared filesystem answers many small requests in parallel):
        call it on ONE rank and share the answer (dist.broadcast_object), not on every rank."""
        if not self.image_dir.is_dir():
            return f"image folder not found: {self.image_dir} (for {self.ann_file})"
        names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        root = str(self.image_dir)

        def missing_in(part: list[str]) -> list[str]:  # one task per thread: no per-file overhead
            return [f for f in part if not os.path.isfile(os.path.join(root, f))]
        with ThreadPoolExecutor(threads) as pool:
            missing = [f for part in pool.map(missing_in, [names[k::threads] for k in range(threads)]) for f in part]
        if missing:
            return (f"{len(missing)} image(s) listed in {self.ann_file} are missing from "
                    f"{self.image_dir}, e.g. {missing[:3]}")
        return None

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def __getitem__(self, item):
        index, flip_seed = item if isinstance(item, tuple) else (item, None)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, ValueError) as e:  # bad input: a user error;
            # any other OSError (EIO, ESTALE on a shared filesystem) stays a crash, and is restarted
            raise DataError(f"cannot read image {path} (image id {image_id}): {e}") from None
        boxes, cats = valid_boxes(self.coco.imgToAnns.get(image_id, []), image.width, image.height)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.cat_to_label[c] for c in cats], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target, flip_seed)
        return image, target


def collate(batch):
    return tuple(zip(*batch))
