"""scripts/predict.py on a checkpoint of a short shapes_tiny run (trained here, 2 ranks): one
process and 2 ranks give identical detections; a PNG per readable image; unreadable inputs named
and skipped; none readable -> exit 2. The run's own evaluation is checked for per-category AP."""
import json
import shutil
import sys

import pytest
import torch

from hvd_megdet import config, predict
from tests.harness import REPO, horovodrun_cmd, run

CLASSES = ["rectangle", "ellipse", "triangle"]
PREDICT = str(REPO / "scripts/predict.py")


def short_run(tmp):
    """shapes_tiny, 8 iterations of 2 ranks x 2 images of 96 px: 32 images seen."""
    return [f"data.root={tmp}/shapes", "data.shapes_train=32", "data.shapes_val=12",
            "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96", "solver.images_per_rank=2",
            "solver.reference_batch=4",
            "solver.max_iter=8", "solver.steps=[6]", "solver.warmup_iters=2", "train.log_period=4",
            "train.checkpoint_period=1000", "train.num_visualizations=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    out = tmp / "run"
    train = [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(out), *short_run(tmp)]
    res = run(horovodrun_cmd(2, "mpi", train), timeout=400)
    assert res.returncode == 0, res.stdout
    inputs = tmp / "inputs"  # the val images, a truncated JPEG and a text file
    shutil.copytree(tmp / "shapes" / "val", inputs)
    jpeg = (inputs / "000003.jpg").read_bytes()
    (inputs / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (inputs / "readme.txt").write_text("not an image\n")
    return tmp, out, out / "checkpoints" / "model_img0000000032.pth", inputs


def test_training_run_writes_per_category_ap(trained):
    tmp, out, ckpt, _ = trained
    metrics = json.loads((out / "eval/metrics.json").read_text())
    per = json.loads((out / "eval/per_category.json").read_text())
    gt = json.loads((tmp / "shapes/annotations/instances_val.json").read_text())
    assert [(c["id"], c["name"]) for c in per] == [(1, "rectangle"), (2, "ellipse"), (3, "triangle")]
    assert [c["gt_boxes"] for c in per] == [sum(a["category_id"] == k for a in gt["annotations"])
                                            for k in (1, 2, 3)]
    with_gt = [c["AP"] for c in per if c["gt_boxes"]]
    assert sum(with_gt) / len(with_gt) == pytest.approx(metrics["AP"], abs=1e-12)
    assert "category  |     AP |   AP50 | GT boxes" in (out / "logs/rank-00000.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {f"eval_per_category/AP-{n}" for n, c in zip(CLASSES, per) if c["gt_boxes"]} <= set(tags)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["class_names"] == CLASSES and state["category_ids"] == [1, 2, 3]


def test_predict_one_process_and_two_ranks_agree(trained):
    tmp, out, ckpt, inputs = trained
    # an older checkpoint without class names: names from the config's annotation file
    old = tmp / "old.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["class_names"], state["category_ids"]
    torch.save(state, old)
    one, two = tmp / "p1", tmp / "p2"
    res1 = run([sys.executable, PREDICT, str(ckpt), str(inputs), "--output-dir", str(one),
                "--score-thresh", "0.05"], timeout=300)
    res2 = run(horovodrun_cmd(2, "gloo", [sys.executable, PREDICT, str(old), f"{inputs}/*",  # a glob, quoted
                                          "--score-thresh=0.05", "--output-dir", str(two),
                                          "train.threads_per_rank=1"]), timeout=300)
    files = sorted(p.name for p in inputs.iterdir())  # image ids are 1.. in this order
    readable = [f for f in files if f.endswith(".jpg") and f != "truncated.jpg"]
    for res, d in ((res1, one), (res2, two)):
        assert res.returncode == 0, res.stdout
        assert "skipped 2 of 14 input(s)" in res.stdout, res.stdout
        assert "readme.txt: UnidentifiedImageError" in res.stdout and "truncated.jpg: OSError" in res.stdout
        pngs = sorted(p.name for p in (d / "images").iterdir())
        assert pngs == sorted(f"{files.index(f) + 1:06d}_{f[:-4]}.png" for f in readable)
    p1 = json.loads((one / "predictions.json").read_text())
    p2 = json.loads((two / "predictions.json").read_text())
    assert p1 == p2 and len({d["image_id"] for d in p1}) >= len(readable) // 2, (len(p1), p1[:3])
    for d in p1:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "file_name", "category_name"}
        assert d["file_name"] == str(inputs / files[d["image_id"] - 1]) and d["score"] >= 0.05
        assert CLASSES[d["category_id"] - 1] == d["category_name"] and len(d["bbox"]) == 4
    # the checkpoint's own evaluation (the same model on the same images, in batches of 2): the same boxes
    def same(e, d):
        close = max(abs(a - b) for a, b in zip(e["bbox"], d["bbox"])) < 0.05
        return close and (e["image_id"], e["category_id"]) == (d["image_id"], d["category_id"]) and \
            abs(e["score"] - d["score"]) < 1e-3
    evald = [e for e in json.loads((out / "eval/detections.json").read_text()) if e["score"] >= 0.1]
    assert evald and sum(any(same(e, d) for d in p1) for e in evald) >= 0.9 * len(evald)


def test_no_readable_input_is_a_user_error(trained):
    tmp, _, ckpt, inputs = trained
    bad = tmp / "bad"
    bad.mkdir()
    for f in ("truncated.jpg", "readme.txt"):
        shutil.copy(inputs / f, bad)
    res = run([sys.executable, PREDICT, str(ckpt), str(bad), "--output-dir", str(tmp / "p3")], timeout=300)
    assert res.returncode == 2, res.stdout
    assert "NoReadableImages: none of the 2 input(s) is a readable image" in res.stdout
    assert not (tmp / "p3" / "predictions.json").exists()


def test_inputs_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/2.png", "a/1.jpg", "a/.hidden", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    got = predict.expand_inputs([str(tmp_path / "b.jpg"), str(tmp_path / "a"), str(tmp_path / "*.jpg")])
    assert got == [tmp_path / "a/1.jpg", tmp_path / "a/2.png", tmp_path / "b.jpg"]
    with pytest.raises(predict.InputNotFound, match="input not found: .*nothing"):
        predict.expand_inputs([str(tmp_path / "nothing")])
    with pytest.raises(predict.InputNotFound, match="matches no file"):
        predict.expand_inputs([str(tmp_path / "*.gif")])
    assert predict.split_arguments(["x.jpg", "data.root=/d", "a=b.jpg", "train.device=cpu"]) == \
        (["x.jpg", "a=b.jpg"], ["data.root=/d", "train.device=cpu"])
    cfg = config.load("shapes_tiny", [f"data.root={tmp_path}/none"])
    assert predict.label_categories({"class_names": ["x", "y"], "category_ids": [5, 9]}, cfg, 2) == \
        (["x", "y"], [5, 9], "the checkpoint")
    names, ids, source = predict.label_categories({}, cfg, 2)   # no names anywhere
    assert (names, ids) == (["class 1", "class 2"], [1, 2]) and source.startswith("nowhere")
