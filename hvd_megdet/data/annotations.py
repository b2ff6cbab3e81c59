"""The COCO instances file itself: read, validated before pycocotools indexes it, indexed.

Every annotation, image and category is checked (:func:`annotation_problems`), so that a bad entry
fails every rank at start-up with a message naming it, not hours into a job when the sampler
reaches it (or as pycocotools' bare KeyError). ``scripts/check_dataset.py`` runs the same checks.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

from pycocotools.coco import COCO

from hvd_megdet.errors import UserError

EXAMPLES_IN_ERROR = 3  # further problems quoted in a DataError (scripts/check_dataset.py lists them all)


class DataError(UserError, ValueError):
    """Bad or missing dataset files; the message names the file."""


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
