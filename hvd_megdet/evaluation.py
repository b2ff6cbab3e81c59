"""COCO bbox evaluation: each rank infers its shard, detections are gathered to rank 0 only, COCOeval.

Writes ``<out>/eval/metrics.json`` (the 12 COCO numbers as fractions, plus the
iteration and images seen; ``eval/history.jsonl`` gets the same record for every evaluation),
``eval/per_category.json`` (AP and AP50 per category, with its number of
non-crowd ground-truth boxes in the evaluated images), ``eval/detections.json`` (the
gathered detections, COCO results format) and a few ``eval/vis/*.png`` with predicted
boxes drawn. The drawing and the model-output -> COCO-results conversion are shared
with ``hvd_megdet/predict.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval
from torchvision.utils import draw_bounding_boxes

from hvd_megdet import dist
from hvd_megdet.data.coco import CocoDetection, collate
from hvd_megdet.data.transforms import image_to_device

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int] | None = None) -> dict:
    """The 12 COCOeval bbox numbers for ``detections`` (COCO results format), and under
    ``"per_category"`` the list of :func:`per_category` entries."""
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else image_ids)
    if not detections:  # loadRes rejects an empty list; nothing detected scores 0 where there is GT
        metrics = {k: 0.0 for k in METRIC_NAMES}
        per_cat = [{**c, "AP": 0.0 if c["gt_boxes"] else None, "AP50": 0.0 if c["gt_boxes"] else None}
                   for c in _categories(coco_gt, image_ids)]
        return {**metrics, "per_category": per_cat}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: max(0.0, float(v)) for k, v in zip(METRIC_NAMES, ev.stats)}
    return {**metrics, "per_category": per_category(ev, coco_gt, image_ids)}


def per_category(ev: COCOeval, coco_gt, image_ids: list[int]) -> list[dict]:
    """AP (IoU 0.50:0.95) and AP50 per category from an accumulated COCOeval, as COCOeval's own
    AP: precision[T, R, K, A, M] at area 'all' and 100 detections, -1 entries (no GT) left out. A
    category without GT in the evaluated images gets None (NaN in detectron2). The mean over the
    categories that have GT is COCOeval's AP (stats[0]): each of them fills all T x R entries."""
    p = ev.params
    precision = ev.eval["precision"][:, :, :, p.areaRngLbl.index("all"), p.maxDets.index(100)]
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    by_id = {c["id"]: c for c in _categories(coco_gt, image_ids)}
    return [{**by_id[cat], "AP": _mean_valid(precision[:, :, k]), "AP50": _mean_valid(precision[t50, :, k])}
            for k, cat in enumerate(p.catIds)]


def _mean_valid(a: np.ndarray) -> float | None:
    a = a[a > -1]
    return float(a.mean()) if a.size else None


def _categories(coco_gt, image_ids: list[int]) -> list[dict]:
    """id, name and number of non-crowd GT boxes in ``image_ids`` of every category, by id."""
    counts: dict[int, int] = {}
    for i in image_ids:
        for a in coco_gt.imgToAnns.get(i, []):
            if not a.get("iscrowd", 0):
                counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    return [{"id": c, "name": coco_gt.cats[c]["name"], "gt_boxes": counts.get(c, 0)}
            for c in sorted(coco_gt.getCatIds())]


def format_table(metrics: dict[str, float]) -> str:
    head = " ".join(f"{k:>6}" for k in METRIC_NAMES)
    row = " ".join(f"{100 * metrics[k]:6.2f}" for k in METRIC_NAMES)
    return f"{head}\n{row}"


def format_category_table(per_cat: list[dict]) -> str:
    """category | AP | AP50 | GT boxes, in percent (as detectron2's per-category table)."""
    w = max([len("category")] + [len(c["name"]) for c in per_cat])

    def pct(v: float | None) -> str:
        return "   nan" if v is None else f"{100 * v:6.2f}"
    lines = [f"{'category':<{w}} |     AP |   AP50 | GT boxes", f"{'-' * w}-|--------|--------|---------"]
    lines += [f"{c['name']:<{w}} | {pct(c['AP'])} | {pct(c['AP50'])} | {c['gt_boxes']:8d}" for c in per_cat]
    return "\n".join(lines)


def detections_to_coco(output: dict, image_id: int, label_to_cat: dict[int, int],
                       score_threshold: float = 0.0) -> list[dict]:
    """One image's model output -> COCO results (xywh boxes, dataset category ids)."""
    boxes = output["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": int(image_id), "category_id": label_to_cat[int(lab)],
             "bbox": [round(v, 3) for v in b], "score": round(float(s), 5)}
            for b, s, lab in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist())
            if s >= score_threshold]


def draw_detections(image: torch.Tensor, output: dict, class_names: list[str],
                    score_threshold: float = 0.5) -> torch.Tensor:
    """``image`` (uint8 CHW, or float in [0, 1]) with the boxes of ``output`` scoring at least
    ``score_threshold`` drawn and labelled "name score"; a uint8 CHW tensor on the CPU."""
    drawn = image.detach().cpu()
    if drawn.dtype != torch.uint8:
        drawn = (drawn * 255).round().clamp(0, 255).to(torch.uint8)
    keep = output["scores"] >= score_threshold
    if not keep.any():
        return drawn
    names = [class_names[lab - 1] if 0 < lab <= len(class_names) else f"class {lab}"
             for lab in output["labels"][keep].tolist()]
    labels = [f"{n} {s:.2f}" for n, s in zip(names, output["scores"][keep].tolist())]
    return draw_bounding_boxes(drawn, output["boxes"][keep].detach().cpu(), labels, width=1)


def write_png(image: torch.Tensor, path) -> None:
    """A uint8 CHW tensor as a PNG file (PIL: torchvision.io's encoders are deprecated)."""
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


@torch.no_grad()
def infer_shard(model, dataset: CocoDetection, indices: list[int], batch_size: int, device) -> list[dict]:
    """Detections for ``indices`` in COCO results format (xywh boxes, original category ids)."""
    results = []
    for start in range(0, len(indices), batch_size):
        images, targets = collate([dataset[i] for i in indices[start:start + batch_size]])
        outputs = model([image_to_device(im, device) for im in images])
        for t, o in zip(targets, outputs):
            results += detections_to_coco(o, t["image_id"], dataset.label_to_cat)
    return results


@torch.no_grad()
def save_visualizations(model, dataset: CocoDetection, indices: list[int], out_dir: Path, device,
                        score_threshold: float = 0.5) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in indices:
        image, target = dataset[i]
        o = model([image_to_device(image, device)])[0]
        write_png(draw_detections(image, o, dataset.class_names, score_threshold),
                  str(out_dir / f"val_{target['image_id']:06d}.png"))


def evaluate(model, dataset: CocoDetection, output_dir, iteration: int, batch_size: int, device,
             max_images: int = 0, num_visualizations: int = 0, log=None, images_seen: int | None = None) -> dict:
    """Distributed evaluation; every rank returns the same metrics dict (with ``per_category``)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = list(range(dist.rank(), n, dist.size()))
    detections = infer_shard(model, dataset, mine, batch_size, device)
    gathered = dist.gather_object(detections, root=0, name=f"eval_detections_{iteration}")  # None off root
    del detections
    metrics = None
    eval_dir = Path(output_dir) / "eval"
    if dist.is_main():
        all_dets = [d for part in gathered for d in part]
        del gathered
        image_ids = [dataset.ids[i] for i in range(n)]
        metrics = coco_metrics(dataset.coco, all_dets, image_ids)
        per_cat = metrics.pop("per_category")
        metrics = {**metrics, "iteration": iteration, "images_seen": images_seen, "images": n,
                   "detections": len(all_dets)}
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_json(eval_dir / "detections.json", all_dets)
        write_json(eval_dir / "metrics.json", metrics)
        write_json(eval_dir / "per_category.json", per_cat)
        try:  # every evaluation of the run, in order (a record: a failed write must not stop rank 0)
            with open(eval_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            if log:
                log.warning("eval/history.jsonl not written: %s", e)
        if num_visualizations:
            save_visualizations(model, dataset, list(range(min(num_visualizations, n))), eval_dir / "vis", device)
        if log:
            log.info("COCO bbox evaluation at iteration %d on %d images:\n%s\nper category:\n%s",
                     iteration, n, format_table(metrics), format_category_table(per_cat))
        metrics["per_category"] = per_cat
    metrics = dist.broadcast_object(metrics, root=0, name=f"eval_metrics_{iteration}")
    model.train(was_training)
    return metrics


def write_json(path: Path, obj) -> None:
    """Atomically (temp file + rename): a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
