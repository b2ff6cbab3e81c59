"""COCO bbox evaluation: each rank infers its shard, detections are gathered to rank 0, COCOeval.

Writes ``<out>/eval/metrics.json`` (the 12 COCO numbers as fractions, plus the
iteration), ``eval/detections.json`` (the gathered detections, COCO results
format) and a few ``eval/vis/*.png`` with predicted boxes drawn.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
from pycocotools.cocoeval import COCOeval
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from hvd_megdet import dist
from hvd_megdet.data.coco import CocoDetection, collate

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """The 12 COCOeval bbox numbers for ``detections`` (COCO results format)."""
    if not detections:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v)) for k, v in zip(METRIC_NAMES, ev.stats)}


def format_table(metrics: dict[str, float]) -> str:
    head = " ".join(f"{k:>6}" for k in METRIC_NAMES)
    row = " ".join(f"{100 * metrics[k]:6.2f}" for k in METRIC_NAMES)
    return f"{head}\n{row}"


@torch.no_grad()
def infer_shard(model, dataset: CocoDetection, indices: list[int], batch_size: int, device) -> list[dict]:
    """Detections for ``indices`` in COCO results format (xywh boxes, original category ids)."""
    results = []
    for start in range(0, len(indices), batch_size):
        images, targets = collate([dataset[i] for i in indices[start:start + batch_size]])
        outputs = model([im.to(device) for im in images])
        for t, o in zip(targets, outputs):
            boxes = o["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for b, s, lab in zip(boxes.tolist(), o["scores"].tolist(), o["labels"].tolist()):
                results.append({"image_id": int(t["image_id"]), "category_id": dataset.label_to_cat[int(lab)],
                                "bbox": [round(v, 3) for v in b], "score": round(float(s), 5)})
    return results


@torch.no_grad()
def save_visualizations(model, dataset: CocoDetection, indices: list[int], out_dir: Path, device,
                        score_threshold: float = 0.5) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in indices:
        image, target = dataset[i]
        o = model([image.to(device)])[0]
        keep = o["scores"] >= score_threshold
        labels = [f"{dataset.class_names[int(lab) - 1]} {s:.2f}"
                  for lab, s in zip(o["labels"][keep].tolist(), o["scores"][keep].tolist())]
        drawn = (image * 255).to(torch.uint8)
        if keep.any():
            drawn = draw_bounding_boxes(drawn, o["boxes"][keep].cpu(), labels, width=1)
        write_png(drawn, str(out_dir / f"val_{target['image_id']:06d}.png"))


def evaluate(model, dataset: CocoDetection, output_dir, iteration: int, batch_size: int, device,
             max_images: int = 0, num_visualizations: int = 0, log=None, images_seen: int | None = None) -> dict:
    """Distributed evaluation; every rank returns the same metrics dict."""
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = list(range(dist.rank(), n, dist.size()))
    detections = infer_shard(model, dataset, mine, batch_size, device)
    gathered = dist.allgather_object(detections, name=f"eval_detections_{iteration}")
    metrics = None
    eval_dir = Path(output_dir) / "eval"
    if dist.is_main():
        all_dets = [d for part in gathered for d in part]
        image_ids = [dataset.ids[i] for i in range(n)]
        metrics = coco_metrics(dataset.coco, all_dets, image_ids)
        metrics = {**metrics, "iteration": iteration, "images_seen": images_seen, "images": n,
                   "detections": len(all_dets)}
        eval_dir.mkdir(parents=True, exist_ok=True)
        _write_json(eval_dir / "detections.json", all_dets)
        _write_json(eval_dir / "metrics.json", metrics)
        if num_visualizations:
            save_visualizations(model, dataset, list(range(min(num_visualizations, n))), eval_dir / "vis", device)
        if log:
            log.info("COCO bbox evaluation at iteration %d on %d images:\n%s", iteration, n, format_table(metrics))
    metrics = dist.broadcast_object(metrics, root=0, name=f"eval_metrics_{iteration}")
    model.train(was_training)
    return metrics


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
