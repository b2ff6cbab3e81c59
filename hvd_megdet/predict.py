"""Detections on any images from a checkpoint (``scripts/predict.py``), in one process or on N ranks.

Rank 0 expands the inputs (files, folders, globs) into one sorted list and shares it; image ids
are 1..N in that order. Rank r takes the inputs r, r + size, ... and infers them one image at a
time: a batch pads its images to a common size, which changes detections near the borders, so
batching would make the output depend on the number of ranks. Each rank draws the PNGs of its
own images; detections and the unreadable inputs are gathered to rank 0 only
(``dist.gather_object``), which writes ``predictions.json``.

The model and config come from the checkpoint (key=value overrides on top); class names from the
checkpoint's ``class_names`` (written since they were added to ``Trainer.state``), else from the
config's val annotation file, else "class N".
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from hvd_megdet import app, checkpoint, config, data, dist, startup
from hvd_megdet.data.transforms import image_to_device
from hvd_megdet.errors import UserError
from hvd_megdet.evaluation import detections_to_coco, draw_detections, write_json, write_png
from hvd_megdet.model import build_model

CLASSIFIER_WEIGHT = "roi_heads.box_predictor.cls_score.weight"  # [classes + background, features]
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")         # section.key=value


class PredictError(UserError):
    """Bad inputs to predict.py; the message names them."""


class InputNotFound(PredictError):
    pass


class NoReadableImages(PredictError):
    pass


def split_arguments(positional: list[str]) -> tuple[list[str], list[str]]:
    """``section.key=value`` items are config overrides, the rest are inputs."""
    overrides = [a for a in positional if _OVERRIDE.match(a)]
    return [a for a in positional if not _OVERRIDE.match(a)], overrides


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files; folders (their files, not recursive, hidden ones left out); globs (``**`` allowed).
    Sorted by path, duplicates removed. An input that names nothing is an InputNotFound."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
        elif p.is_file():
            found.append(p)
        elif any(c in item for c in "*?["):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            files = [m for m in matches if m.is_file()]
            if not files:
                raise InputNotFound(f"input {item!r}: the pattern matches no file")
            found += files
        else:
            raise InputNotFound(f"input not found: {item} (not a file, a folder or a glob)")
    unique = {str(f.absolute()): f for f in reversed(found)}  # the first spelling of a repeated file
    return [unique[k] for k in sorted(unique)]


def read_image(path: Path) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 CHW RGB tensor, None), or (None, why) for a file that is not a readable image."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, named, not inside the model
            im = ImageOps.exif_transpose(im)  # as the user sees a photo taken sideways
            return pil_to_tensor(im.convert("RGB")), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"


def label_categories(state: dict, cfg: config.Config, num_labels: int) -> tuple[list[str], list[int], str]:
    """(names, dataset category ids) of labels 1..num_labels, and where they came from."""
    names, ids, source = state.get("class_names"), state.get("category_ids"), "the checkpoint"
    if not names or len(names) != num_labels:
        names, ids, source = None, None, ""
        ann = data.dataset_root(cfg.data) / cfg.data.val_annotations
        try:  # an older checkpoint: the categories of the dataset it was trained on
            cats = sorted(json.loads(ann.read_text())["categories"], key=lambda c: c["id"])
            if len(cats) == num_labels:
                names, ids, source = [c["name"] for c in cats], [c["id"] for c in cats], str(ann)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if names is None:
        names, source = [f"class {i}" for i in range(1, num_labels + 1)], "nowhere (no names in the " \
            "checkpoint, no readable annotation file in its config)"
    if not ids or len(ids) != num_labels:
        ids = list(range(1, num_labels + 1))
    return list(names), list(ids), source


def load_model(state: dict, cfg: config.Config, path: Path, num_labels: int, device):
    # the checkpoint holds every weight: the backbone's initial weights file is not needed here
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=""))
    model = build_model(cfg, num_labels + 1)  # no BN groups: inference never communicates
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:  # every rank loads the same file: all fail alike
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the model of its config "
                                         f"(overrides?): {str(e).splitlines()[0][:300]}") from None
    return model.to(device).eval()


@torch.no_grad()
def predict_shard(model, files: list[Path], indices: list[int], names: list[str], cat_ids: list[int],
                  score_threshold: float, image_dir: Path, device, log) -> tuple[list[dict], list[list[str]]]:
    """Detections (COCO results + file_name, category_name) and [path, why] of unreadable files."""
    from tqdm import tqdm
    label_to_cat = dict(zip(range(1, len(cat_ids) + 1), cat_ids))
    cat_name = dict(zip(cat_ids, names))
    detections, skipped = [], []
    bar = tqdm(indices, unit="img", desc=f"predict (rank 0's {len(indices)} of {len(files)})",
               disable=not dist.is_main(), dynamic_ncols=True)
    for i in bar:
        path, image_id = files[i], i + 1
        image, why = read_image(path)
        if image is None:
            log.warning("skipped %s: not a readable image (%s)", path, why)
            skipped.append([str(path), why])
            continue
        output = model([image_to_device(image, device)])[0]
        detections += [{**d, "file_name": str(path), "category_name": cat_name[d["category_id"]]}
                       for d in detections_to_coco(output, image_id, label_to_cat, score_threshold)]
        write_png(draw_detections(image, output, names, score_threshold),
                  image_dir / f"{image_id:06d}_{path.stem}.png")
    bar.close()
    return detections, skipped


def run(checkpoint_path: str, inputs: list[str], output_dir: str | None, score_threshold: float,
        overrides: list[str]) -> int:
    """The whole of predict.py on this rank; returns the exit code (0), raises a UserError else."""
    ckpt = Path(checkpoint_path)
    state = checkpoint.load(ckpt)  # every rank: a missing or corrupt file fails everywhere alike
    if not (isinstance(state, dict) and "config" in state and CLASSIFIER_WEIGHT in state.get("model", {})):
        raise checkpoint.CheckpointError(f"{ckpt} is not a checkpoint of this trainer (no config or model)")
    cfg = config.from_dict(state["config"], overrides)
    out, log = app.start(cfg, output_dir or ckpt.resolve().parent.parent / "predictions", write_config=False)
    device = startup.choose_device(cfg, log)
    num_labels = state["model"][CLASSIFIER_WEIGHT].shape[0] - 1
    # one listing (and one annotation read) shared: every rank shards the same list
    listing = dist.root_decides(lambda: {"files": [str(f) for f in expand_inputs(inputs)],
                                         "categories": label_categories(state, cfg, num_labels)},
                                "predict_inputs", InputNotFound, catch=(InputNotFound,))
    files = [Path(f) for f in listing["files"]]
    names, cat_ids, source = listing["categories"]
    model = load_model(state, cfg, ckpt, num_labels, device)
    del state
    log.info("predicting %d input(s) on %d rank(s) with %s, score >= %g; class names from %s: %s",
             len(files), dist.size(), ckpt, score_threshold, source, ", ".join(names))
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    mine = list(range(dist.rank(), len(files), dist.size()))
    dets, skipped = predict_shard(model, files, mine, names, cat_ids, score_threshold, image_dir, device, log)
    parts = dist.gather_object((dets, skipped), root=0, name="predict_results")
    summary = None
    if dist.is_main():
        dets = sorted((d for part, _ in parts for d in part), key=lambda d: d["image_id"])  # stable
        skipped = sorted((s for _, part in parts for s in part))
        summary = {"read": len(files) - len(skipped), "skipped": skipped}
        if summary["read"]:
            write_json(out / "predictions.json", dets)
            log.info("%d detection(s) on %d image(s): %s; drawn images in %s", len(dets), summary["read"],
                     out / "predictions.json", image_dir)
        if skipped:
            log.warning("skipped %d of %d input(s) that are not readable images:\n%s", len(skipped),
                        len(files), "\n".join(f"  {p}: {why}" for p, why in skipped))
    summary = dist.broadcast_object(summary, name="predict_summary")
    if not summary["read"]:
        raise NoReadableImages(f"none of the {len(files)} input(s) is a readable image: "
                               + "; ".join(p for p, _ in summary["skipped"][:5])
                               + (" ..." if len(summary["skipped"]) > 5 else ""))
    return 0
