"""COCO instances read with pycocotools (the real COCO 2017 layout, or the shapes set in the same layout).

The raw JSON is validated before pycocotools indexes it (:func:`annotation_problems`): every
annotation, image and category, so that a bad entry fails every rank at start-up with a message
naming it, not hours into a job when the sampler reaches it (or as pycocotools' bare KeyError).
Legal but unusable boxes -- crowd, or under 1 px wide or high after clipping to the image -- are
dropped from training targets and counted (:meth:`CocoDetection.summary`); training keeps only
images with at least one box left. Category ids are mapped to contiguous labels 1..K (0 is
background for torchvision's Faster R-CNN) and back for evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO

from hvd_megdet.errors import UserError

EXAMPLES_IN_ERROR = 3  # further problems quoted in a DataError (scripts/check_dataset.py lists them all)


class DataError(UserError, ValueError):
    """Bad or missing dataset files; the message names the file."""


# --- the annotation file ---------------------------------------------------
def read_annotations(ann_file: str | os.PathLike) -> dict:
    """The raw JSON of a COCO instances file, with its 'images', 'annotations', 'categories' lists."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file is not valid JSON: {ann_file}: {e}") from None
    if not isinstance(dataset, dict):
        raise DataError(f"annotation file is not in COCO instances format (not a JSON object): {ann_file}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"annotation file has no '{key}' list: {ann_file}")
    return dataset


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _ids_text(ids: set) -> str:
    shown = sorted(ids, key=repr)
    return ", ".join(map(_show, shown)) if len(shown) <= 10 else \
        ", ".join(map(_show, shown[:8])) + f", ... {len(shown)} ids"


def _is_number(v) -> bool:
    return type(v) in (int, float)  # JSON numbers; not bool, not str


def _entry_fault(k: int, entry, what: str, seen: set, fields) -> tuple[str, str] | None:
    """What is wrong with image or category entry #k (adds its id to ``seen``)."""
    lists = "images" if what == "image" else "categories"
    if not isinstance(entry, dict):
        return f"bad {what} entry", f"{what} #{k} is not an object: {_show(entry)}"
    if "id" not in entry:
        return f"bad {what} entry", f"{what} #{k} has no 'id'"
    i = entry["id"]
    try:
        if i in seen:
            return f"duplicate {what} id", f"{what} id {_show(i)}: listed more than once in '{lists}'"
        seen.add(i)
    except TypeError:
        return f"bad {what} entry", f"{what} #{k}: id {_show(i)} is not a number or string"
    faults = [why for key, ok, why in fields if not ok(entry.get(key))]
    return (f"bad {what} entry", f"{what} id {_show(i)}: " + ", ".join(faults)) if faults else None


IMAGE_FIELDS = (("file_name", lambda v: isinstance(v, str) and v != "", "no 'file_name'"),
                ("width", lambda v: _is_number(v) and v > 0, "'width' is not a positive number"),
                ("height", lambda v: _is_number(v) and v > 0, "'height' is not a positive number"))
CATEGORY_FIELDS = (("name", lambda v: isinstance(v, str), "no 'name'"),)


def _annotation_fault(k: int, a, cat_ids: set, img_ids: set, seen: set) -> tuple[str, str] | None:
    """The slow path: why annotation #k failed the fast check, or None (it is fine after all)."""
    if not isinstance(a, dict):
        return "bad annotation entry", f"annotation #{k} is not an object: {_show(a)}"
    faults = []  # (kind, text), the first one names the kind
    aid, iid = a.get("id"), a.get("image_id")
    if "id" not in a:
        faults.append(("bad annotation id", "no 'id'"))
    else:
        try:
            if aid in seen:
                faults.append(("duplicate annotation id", "listed more than once in 'annotations'"))
            seen.add(aid)
        except TypeError:
            faults.append(("bad annotation id", "id is not a number or string"))
    if "bbox" not in a:
        faults.append(("bad bbox", "no 'bbox'"))
    else:
        b = a["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(map(_is_number, b))):
            faults.append(("bad bbox", f"bbox {_show(b)} is not four numbers [x, y, width, height]"))
        elif not all(map(math.isfinite, b)):
            faults.append(("bad bbox", f"bbox {_show(b)} is not finite"))
    if "category_id" not in a:
        faults.append(("unknown category_id", "no 'category_id'"))
    else:
        try:
            known = a["category_id"] in cat_ids
        except TypeError:
            known = False
        if not known:
            faults.append(("unknown category_id", f"category_id {_show(a['category_id'])} is not in "
                                                  f"'categories' ({_ids_text(cat_ids)})"))
    if "image_id" not in a:
        faults.append(("unknown image_id", "no 'image_id'"))
    else:
        try:
            known = iid in img_ids
        except TypeError:
            known = False
        if not known:
            faults.append(("unknown image_id", f"image_id {_show(iid)} is not in 'images'"))
    if not faults:
        return None
    where = f"annotation id {_show(aid)}" if "id" in a else f"annotation #{k}"
    return faults[0][0], f"{where} (image id {_show(iid)}): " + "; ".join(t for _, t in faults)


def annotation_problems(dataset: dict) -> list[tuple[str, str]]:
    """Every violation in a COCO instances dict (from :func:`read_annotations`), in file order, as
    (kind, text); [] when clean. Checked: ids unique (categories, images, annotations); each
    category has a name, each image a file_name and a positive width and height; each annotation
    has a bbox of four finite numbers, a category_id in 'categories', an image_id in 'images'.
    Fast on COCO's 860k annotations: a clean entry costs one cheap test, only a failing one is
    looked at closely."""
    problems: list[tuple[str, str]] = []
    cat_ids: set = set()
    img_ids: set = set()
    for what, entries, seen, fields in (("category", dataset["categories"], cat_ids, CATEGORY_FIELDS),
                                        ("image", dataset["images"], img_ids, IMAGE_FIELDS)):
        for k, entry in enumerate(entries):
            fault = _entry_fault(k, entry, what, seen, fields)
            if fault:
                problems.append(fault)
    seen: set = set()
    isfinite = math.isfinite
    for k, a in enumerate(dataset["annotations"]):
        try:  # the fast path; a str, list or None anywhere raises TypeError, a missing key KeyError
            b, aid = a["bbox"], a["id"]
            if type(b) is list and len(b) == 4 and isfinite(b[0] + b[1] + b[2] + b[3]) \
                    and a["category_id"] in cat_ids and a["image_id"] in img_ids and aid not in seen:
                seen.add(aid)
                continue
        except (KeyError, TypeError):
            pass
        fault = _annotation_fault(k, a, cat_ids, img_ids, seen)
        if fault:
            problems.append(fault)
    return problems


def problems_message(ann_file: str | os.PathLike, problems: list[tuple[str, str]]) -> str:
    """One line: the file, the first problem, how many more and a few of them."""
    msg = f"{ann_file}: {problems[0][1]}"
    rest = problems[1:]
    if rest:
        annotations = all(t.startswith("annotation") for _, t in rest)
        noun = ("annotation", "annotations") if annotations else ("entry", "entries")
        noun = noun[len(rest) > 1]
        msg += f"; {len(rest)} more bad {noun}: " + " | ".join(t for _, t in rest[:EXAMPLES_IN_ERROR])
        if len(rest) > EXAMPLES_IN_ERROR:
            msg += " | ..."
        msg += " (scripts/check_dataset.py lists them all)"
    return msg


def coco_from(dataset: dict) -> COCO:
    """pycocotools' index over an already read (and validated) dataset dict."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco.createIndex()
    return coco


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Read and validate ``ann_file``: the first problem (and the count of the others) -> DataError."""
    dataset = read_annotations(ann_file)
    problems = annotation_problems(dataset)
    if problems:
        raise DataError(problems_message(ann_file, problems))
    return coco_from(dataset)


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
