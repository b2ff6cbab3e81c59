"""COCO instances read with pycocotools (the real COCO 2017 layout, or the shapes set in the same layout).

The raw JSON is validated before pycocotools indexes it (data/annotations.py). Legal but unusable boxes -- crowd, or under 1 px wide or high after clipping to the image -- are
dropped from training targets and counted (:meth:`CocoDetection.summary`); training keeps only
images with at least one box left. Category ids are mapped to contiguous labels 1..K (0 is
background for torchvision's Faster R-CNN) and back for evaluation.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO

from hvd_megdet.data.annotations import DataError, load_coco

# --- boxes and image files -------------------------------------------------
def valid_boxes(anns: list[dict], width: int, height: int, dropped: Counter | None = None):
    """xyxy boxes and category ids of the non-crowd annotations with positive clipped size; the
    others are counted in ``dropped`` ("crowd", "degenerate") when given."""
    boxes, cats = [], []
    for a in anns:
        if a.get("iscrowd", 0):
            if dropped is not None:
                dropped["crowd"] += 1
            continue
        x, y, w, h = a["bbox"]
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            boxes.append([x0, y0, x1, y1])
            cats.append(a["category_id"])
        elif dropped is not None:
            dropped["degenerate"] += 1
    return boxes, cats


def read_image(path: Path, image_id) -> Image.Image:
    """The image at ``path``, fully decoded to RGB. Bad data -- a missing or unreadable file, not an
    image, truncated or corrupt, a decompression bomb -- is a DataError naming the file and image:
    no restart can fix it. An OSError with an errno (EIO, ESTALE: the filesystem failed, not the
    file) is re-raised: a crash, which a launcher restarts."""
    try:
        with Image.open(path) as im:  # Image.open is lazy: convert() decodes, inside this try
            return im.convert("RGB")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"cannot read image {path} (image id {image_id}): {e}") from None
    except OSError as e:  # PIL's own: "image file is truncated", "broken data stream", "cannot identify"
        if e.errno is not None:
            raise
        raise DataError(f"cannot decode image {path} (image id {image_id}): {e}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: "broken PNG file"
        raise DataError(f"cannot decode image {path} (image id {image_id}): {type(e).__name__}: {e}") \
            from None


def missing_image_files(image_dir: str | os.PathLike, names: list[str], threads: int = 32) -> list[str]:
    """The names not found as files in ``image_dir``, stat'ed in ``threads`` threads (a shared
    filesystem answers many small requests in parallel)."""
    root = str(image_dir)

    def missing_in(part: list[str]) -> list[str]:  # one task per thread: no per-file overhead
        return [f for f in part if not os.path.isfile(os.path.join(root, f))]
    with ThreadPoolExecutor(threads) as pool:
        return [f for part in pool.map(missing_in, [names[k::threads] for k in range(threads)]) for f in part]


class CocoDetection(torch.utils.data.Dataset):
    """Items are ``(image_tensor, target)``; indexed by ``(index, flip_seed)`` pairs from the sampler.
    ``coco``: an index already built from ``ann_file`` (:func:`coco_from`), else it is read here."""

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, train: bool,
                 transform=None, coco: COCO | None = None):
        self.image_dir = Path(image_dir)
        self.coco = coco if coco is not None else load_coco(ann_file)
        self.ann_file = Path(ann_file)
        self.train = train
        self.transform = transform
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DataError(f"annotation file has no categories: {ann_file}")
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.cat_to_label = {c: i for i, c in self.label_to_cat.items()}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        all_ids = sorted(self.coco.imgs)
        dropped, kept, with_box = Counter(), 0, []
        for i in all_ids:
            info = self.coco.imgs[i]
            n = len(valid_boxes(self.coco.imgToAnns.get(i, []), info["width"], info["height"], dropped)[0])
            kept += n
            if n:
                with_box.append(i)
        # as torchvision's reference: train only on images with a usable box
        self.ids = with_box if train else all_ids
        self.stats = {"images": len(all_ids), "images_used": len(self.ids), "boxes_kept": kept,
                      "dropped_crowd": dropped["crowd"], "dropped_degenerate": dropped["degenerate"],
                      "images_without_box": len(all_ids) - len(with_box)}

    def summary(self) -> str:
        """One log line: images, boxes kept, boxes dropped by reason, images without a usable box."""
        s = self.stats
        return (f"{self.ann_file}: {s['images']} images, {s['boxes_kept']} boxes kept, dropped "
                f"{s['dropped_crowd']} crowd + {s['dropped_degenerate']} degenerate (under 1 px after "
                f"clipping to the image); {s['images_without_box']} images without a usable box"
                + (" (not trained on)" if self.train and s["images_without_box"] else ""))

    def missing_files(self, threads: int = 32) -> str | None:
        """Why the image files are unusable (folder or files missing), or None. Stats every file,
        in ``threads`` threads: call it on ONE rank and share the answer (dist.broadcast_object),
        not on every rank."""
        if not self.image_dir.is_dir():
            return f"image folder not found: {self.image_dir} (for {self.ann_file})"
        names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        missing = missing_image_files(self.image_dir, names, threads)
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

    def __getstate__(self):
        """What a DataLoader worker gets (forkserver workers receive a pickled copy): only what
        __getitem__ reads, not the whole annotation file (COCO train2017 with its segmentation
        polygons is ~450 MB, and a node runs ranks x workers of them)."""
        return {**self.__dict__, "coco": _SlimCOCO(self.coco, self.ids)}

    def __getitem__(self, item):
        index, flip_seed = item if isinstance(item, tuple) else (item, None)
        image_id = self.ids[index]
        image = read_image(self.image_dir / self.coco.imgs[image_id]["file_name"], image_id)
        boxes, cats = valid_boxes(self.coco.imgToAnns.get(image_id, []), image.width, image.height)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.cat_to_label[c] for c in cats], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target, flip_seed)
        return image, target


class _SlimCOCO:
    """The part of a pycocotools COCO that CocoDetection.__getitem__ reads, for ``ids``."""

    def __init__(self, coco, ids):
        self.imgs = {i: {k: coco.imgs[i][k] for k in ("file_name", "width", "height")} for i in ids}
        self.imgToAnns = {i: [{k: a[k] for k in ("bbox", "category_id", "iscrowd") if k in a}
                              for a in coco.imgToAnns.get(i, [])] for i in ids}


def collate(batch):
    return tuple(zip(*batch))
