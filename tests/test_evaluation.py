"""Per-category AP against pycocotools' own COCOeval on a real COCO-format set (the shapes
generator), and evaluation.evaluate end to end in one process with a real (untrained) model."""
import json
import logging
import random

import pytest
import torch

from hvd_megdet import config, evaluation
from hvd_megdet.data import shapes
from hvd_megdet.data.annotations import load_coco
from hvd_megdet.data.coco import CocoDetection
from hvd_megdet.data.transforms import EvalTransform
from hvd_megdet.evaluation import coco_metrics, format_category_table
from hvd_megdet.model import build_model

STAR = {"id": 7, "name": "star", "supercategory": "shape"}  # a category without any GT box


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """The shapes val set (40 images) with one more category that has no annotation."""
    root = shapes.ensure(tmp_path_factory.mktemp("shapes"), 4, 40, 96, seed=5)
    gt = json.loads((root / "annotations/instances_val.json").read_text())
    gt["categories"].append(STAR)
    path = root / "annotations/val_with_star.json"
    path.write_text(json.dumps(gt))
    return root, path, gt


def noisy_detections(gt: dict, seed: int = 0) -> list[dict]:
    """GT boxes jittered, some missed, some with the wrong class, plus false positives; random
    scores. More than 10 detections per image and category: the cap that counts is COCO's 100."""
    rng = random.Random(seed)
    cats = [c["id"] for c in gt["categories"] if c["id"] != STAR["id"]]
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        box = [x + rng.uniform(-0.2, 0.2) * w, y + rng.uniform(-0.2, 0.2) * h,
               w * rng.uniform(0.75, 1.25), h * rng.uniform(0.75, 1.25)]
        cat = a["category_id"] if rng.random() > 0.1 else rng.choice(cats)
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": rng.random()})
    for im in gt["images"]:
        for cat in cats:
            for _ in range(rng.randint(10, 16)):
                w, h = rng.uniform(8, 40), rng.uniform(8, 40)
                dets.append({"image_id": im["id"], "category_id": cat, "score": 0.6 * rng.random(),
                             "bbox": [rng.uniform(0, 96 - w), rng.uniform(0, 96 - h), w, h]})
    return dets


def cocoeval_of_one_category(coco, dets, cat, image_ids):
    """pycocotools' AP / AP50 restricted to one category (an independent computation)."""
    import contextlib
    import io
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.imgIds, ev.params.catIds = image_ids, [cat]
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats[0], ev.stats[1]


@pytest.mark.parametrize("subset", [None, 25])
def test_per_category_ap_averages_to_cocoeval_ap(val_set, subset):
    root, path, gt = val_set
    coco = load_coco(path)
    dets = noisy_detections(gt)
    image_ids = sorted(coco.getImgIds())[:subset] if subset else None
    m = coco_metrics(coco, dets, image_ids)
    per = m["per_category"]
    ids = image_ids or sorted(coco.getImgIds())
    assert [(c["id"], c["name"]) for c in per] == [(c["id"], c["name"]) for c in gt["categories"]]
    star = per[-1]
    assert star == {"id": 7, "name": "star", "gt_boxes": 0, "AP": None, "AP50": None}
    shapes_cats = per[:-1]
    for c in shapes_cats:
        assert c["gt_boxes"] == sum(1 for a in gt["annotations"] if a["category_id"] == c["id"]
                                    and a["image_id"] in ids and not a["iscrowd"])
        assert 0.05 < c["AP"] < 0.95 and c["AP"] <= c["AP50"]  # noisy detections: neither 0 nor perfect
        ap, ap50 = cocoeval_of_one_category(coco, dets, c["id"], ids)
        assert (c["AP"], c["AP50"]) == pytest.approx((ap, ap50), abs=1e-12)
    # the mean over the categories with GT is COCOeval's AP (stats[0]) and AP50 (stats[1])
    assert sum(c["AP"] for c in shapes_cats) / len(shapes_cats) == pytest.approx(m["AP"], abs=1e-12)
    assert sum(c["AP50"] for c in shapes_cats) / len(shapes_cats) == pytest.approx(m["AP50"], abs=1e-12)
    assert '"AP": null' in json.dumps(per)  # the category without GT is null in JSON
    table = format_category_table(per).splitlines()
    assert table[0].split("|") == ["category  ", "     AP ", "   AP50 ", " GT boxes"]
    first = per[0]
    assert table[2].split() == ["rectangle", "|", f"{100 * first['AP']:.2f}", "|",
                                f"{100 * first['AP50']:.2f}", "|", str(first["gt_boxes"])]
    assert table[-1].split() == ["star", "|", "nan", "|", "nan", "|", "0"]


def test_no_detections(val_set):
    _, path, _ = val_set
    m = coco_metrics(load_coco(path), [])
    assert m["AP"] == 0.0 and [c["AP"] for c in m["per_category"]] == [0.0, 0.0, 0.0, None]


def test_evaluate_writes_per_category_and_feeds_the_model_float_images(val_set, tmp_path, caplog):
    """evaluation.evaluate in one process with a real model: per_category.json and the logged
    table; every image reaching the model (inference and visualisations) is float in [0, 1]."""
    root, path, gt = val_set
    cfg = config.load("shapes_tiny", ["data.min_size=96", "data.max_size=96"])
    ds = CocoDetection(root / "val", path, train=False, transform=EvalTransform())
    torch.manual_seed(0)
    model = build_model(cfg, ds.num_classes)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.extend(
        (im.dtype, float(im.min()), float(im.max())) for im in args[0]))
    log = logging.getLogger("test_evaluate")
    with caplog.at_level(logging.INFO, logger="test_evaluate"):
        m = evaluation.evaluate(model, ds, tmp_path, 3, 2, torch.device("cpu"), max_images=5,
                                num_visualizations=2, log=log)
    assert len(seen) == 5 + 2 and all(d == torch.float32 and 0 <= lo <= hi <= 1 for d, lo, hi in seen)
    assert min(hi for _, _, hi in seen) > 0.5  # really scaled pixels, not uint8 / 255 twice
    per = json.loads((tmp_path / "eval/per_category.json").read_text())
    assert per == m["per_category"]
    assert [c["name"] for c in per] == ["rectangle", "ellipse", "triangle", "star"]
    assert per[-1]["AP"] is None and all(c["AP"] is not None for c in per[:-1])
    assert sum(c["gt_boxes"] for c in per) == sum(1 for a in gt["annotations"] if a["image_id"] in ds.ids[:5])
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert "per_category" not in metrics and metrics["iteration"] == 3 and metrics["images"] == 5
    assert len(list((tmp_path / "eval/vis").glob("val_*.png"))) == 2
    assert "category  |     AP |   AP50 | GT boxes" in caplog.text and "star" in caplog.text
