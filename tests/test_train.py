"""The trainer end to end under horovodrun: learning, rank consistency, exact resume,
evaluation equal to pycocotools, the output folder, and bad input ending every rank."""
import contextlib
import io
import json
import re
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvd_megdet.evaluation import METRIC_NAMES
from tests.harness import REPO, horovodrun_cmd, launch, run

ITERS = 16


def small(tmp_path, iters=ITERS, images=2):
    """A small, fast shapes_tiny: 64 train / 16 val images of 96 px."""
    return [f"data.root={tmp_path}/shapes", "data.shapes_train=64", "data.shapes_val=16",
            "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96",
            f"solver.images_per_rank={images}", "solver.reference_batch=4", "solver.scale_schedule=false",
            f"solver.max_iter={iters}", f"solver.steps=[{iters * 3 // 4}]", "solver.warmup_iters=2",
            "train.log_period=2", "train.checkpoint_period=1000", "train.num_visualizations=2"]


def train_job(tmp_path, np_, controller, overrides, resume):
    results, _ = launch("tests.workers.train_checks", np_, controller, tmp_path / "runs",
                        ["--overrides", json.dumps(overrides), "--iters", str(ITERS), "--resume", resume],
                        timeout=600)
    return results


def test_train_two_ranks_resume_and_eval(tmp_path):
    results = train_job(tmp_path, 2, "gloo", small(tmp_path), resume="1")
    a = tmp_path / "runs" / "A"
    # identical parameters on every rank
    assert len(set(results[0]["A_digests_all_ranks"])) == 1
    # the loss falls
    recs = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == list(range(2, ITERS + 1, 2))
    assert sum(r["loss"] for r in recs[-2:]) < 0.8 * sum(r["loss"] for r in recs[:2]), recs
    # resume after k iterations == uninterrupted run (CPU, deterministic)
    r0 = results[0]
    assert r0["B_checkpoints"] == [f"model_{ITERS // 2:07d}.pth"] and r0["B_resumed_at"] == ITERS // 2
    assert r0["max_abs_diff"] < 1e-6 and r0["B_sum"] == pytest.approx(r0["A_sum"], rel=1e-9)
    # outputs
    assert (a / "config.yaml").is_file() and (a / "checkpoints" / f"model_{ITERS:07d}.pth").is_file()
    for r in range(2):
        head = (a / "logs" / f"rank-{r:05d}.log").read_text()
        assert f"rank={r:05d}" in head and f"rank {r} of 2" in head and "horovod 0.28.1" in head
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((a / "eval" / "vis").glob("*.png"))) == 2
    # evaluation == pycocotools run directly on the gathered detections
    metrics = json.loads((a / "eval" / "metrics.json").read_text())
    assert metrics["iteration"] == ITERS and set(METRIC_NAMES) <= set(metrics)
    dets = json.loads((a / "eval" / "detections.json").read_text())
    image_ids = {d["image_id"] for d in dets}
    assert len(image_ids) > 8, "both ranks' shards should have detections"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "shapes" / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [metrics[k] for k in METRIC_NAMES] == pytest.approx([max(0.0, v) for v in ev.stats], abs=1e-12)


def test_train_four_ranks_oversubscribed_mpi(tmp_path):
    overrides = small(tmp_path, iters=6) + ["train.num_visualizations=0"]  # later values win
    results = launch("tests.workers.train_checks", 4, "mpi", tmp_path / "runs",
                     ["--overrides", json.dumps(overrides), "--iters", "6", "--resume", "0"], timeout=600)[0]
    assert len({r["A_digest"] for r in results}) == 1
    assert json.loads((tmp_path / "runs" / "A" / "eval" / "metrics.json").read_text())["iteration"] == 6


def bad_fixture(tmp_path):
    from hvd_megdet.data import shapes
    root = shapes.ensure(tmp_path / "set", 8, 4, 64, seed=2)
    coco_args = [f"data.root={root}", "data.train_images=train", "data.val_images=val",
                 "data.train_annotations=annotations/instances_train.json",
                 "data.val_annotations=annotations/instances_val.json", "data.dataset=coco"]
    return root, coco_args


def _write_bad_json(root):
    (root / "annotations/bad.json").write_text("{oops")
    return ["data.val_annotations=annotations/bad.json"]


def _delete_image(root):
    (root / "val" / "000002.jpg").unlink()
    return []


# case -> (prepare(root) -> extra overrides, what every rank must report)
CASES = {
    "missing_annotations": (lambda root: ["data.train_annotations=annotations/missing.json"],
                            "annotation file not found: .*missing.json"),
    "malformed_annotations": (_write_bad_json, "not valid JSON: .*bad.json"),
    "missing_image": (_delete_image, "000002.jpg"),
    "unknown_key": (lambda root: ["solver.learning_rate=0.1"], "solver.learning_rate"),
    "bad_value": (lambda root: ["solver.images_per_rank=0"], "solver.images_per_rank"),
    "bn_group": (lambda root: ["model.bn_group_size=3"], "BN group size 3 does not divide the world size 2"),
    "too_small": (lambda root: ["solver.images_per_rank=8"], "too small for one batch of 8 per rank on 2"),
    "unwritable_output": (lambda root: [], "cannot be written"),
    # a diverging run: every rank stops at the same iteration, naming it and the rank(s)
    "nonfinite_loss": (lambda root: ["solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=40",
                                     "solver.steps=[30]"], r"non-finite loss at iteration \d+ on rank\(s\) \["),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_every_rank(tmp_path, case):
    prepare, needle = CASES[case]
    root, coco_args = bad_fixture(tmp_path)
    args = coco_args + ["solver.max_iter=4", "solver.steps=[2]", "solver.images_per_rank=2"] + prepare(root)
    out = "/proc/hvd_megdet_cannot_write" if case == "unwritable_output" else str(tmp_path / "out")
    controller = ("gloo", "mpi")[sorted(CASES).index(case) % 2]
    cmd = horovodrun_cmd(2, controller, [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", out, *args])
    res = run(cmd, timeout=180)
    assert res.returncode != 0, res.stdout
    for r in range(2):
        assert re.search(f"rank {r}/2: .*{needle}", res.stdout), f"rank {r} did not report '{needle}':\n{res.stdout}"
