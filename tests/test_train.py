"""The trainer end to end under horovodrun: learning, rank consistency, exact resume,
evaluation equal to pycocotools, the output folder, and bad input ending every rank."""
import contextlib
import io
import json
import re
import shutil
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvd_megdet import checkpoint
from hvd_megdet.evaluation import METRIC_NAMES
from tests.harness import CONTROLLERS, REPO, horovodrun_cmd, launch, launcher_env, run

ITERS = 16


def small(tmp_path, iters=ITERS, images=2):
    """A small, fast shapes_tiny: 64 train / 16 val images of 96 px."""
    return [f"data.root={tmp_path}/shapes", "data.shapes_train=64", "data.shapes_val=16",
            "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96",
            f"solver.images_per_rank={images}", "solver.reference_batch=4",
            f"solver.max_iter={iters}", f"solver.steps=[{iters * 3 // 4}]", "solver.warmup_iters=2",
            "train.log_period=2", "train.checkpoint_period=1000", "train.num_visualizations=2"]


def train_job(tmp_path, np_, controller, overrides, mode, timeout=600):
    results, _ = launch("tests.workers.train_checks", np_, controller, tmp_path / "runs",
                        ["--overrides", json.dumps(overrides), "--mode", mode], timeout=timeout)
    return results


def test_train_two_ranks_resume_and_eval(tmp_path):
    results = train_job(tmp_path, 2, "gloo", small(tmp_path), mode="resume")
    a = tmp_path / "runs" / "A"
    # identical parameters on every rank
    assert len(set(results[0]["A_digests_all_ranks"])) == 1
    # the loss falls; progress in images (2 ranks x 2 images per iteration)
    recs = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == list(range(2, ITERS + 1, 2))
    assert [r["images"] for r in recs] == [4 * r["iteration"] for r in recs]
    later = [r["loss"] for r in recs[len(recs) // 2:]]
    assert sum(later) / len(later) < 0.85 * recs[0]["loss"], recs  # from ~ln(4) + ln(2) at the start
    # resume after half the images == uninterrupted run (CPU, deterministic)
    r0 = results[0]
    assert r0["B_checkpoints"] == [f"model_img{2 * ITERS:010d}.pth"]
    assert (r0["B_resumed_images"], r0["B_resumed_iteration"]) == (2 * ITERS, ITERS // 2)
    # lr by hand: 0.02 x 4/4, warmup 8 images (x0.001 -> 1), x0.1 from 48 images (iteration 12)
    hand = [0.02 * (0.001 + 0.999 * min(1, 4 * i / 8)) * (0.1 if 4 * i >= 48 else 1) for i in range(ITERS)]
    assert r0["B_lrs"] == pytest.approx([hand[i - 1] for i in range(2, ITERS + 1, 2)])
    assert r0["max_abs_diff"] < 1e-6 and r0["B_sum"] == pytest.approx(r0["A_sum"], rel=1e-9)
    # outputs
    assert (a / "config.yaml").is_file() and (a / "checkpoints" / f"model_img{4 * ITERS:010d}.pth").is_file()
    for r in range(2):
        head = (a / "logs" / f"rank-{r:05d}.log").read_text()
        assert f"rank={r:05d}" in head and f"rank {r} of 2" in head and "horovod 0.28.1" in head
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((a / "eval" / "vis").glob("*.png"))) == 2
    # evaluation == pycocotools run directly on the gathered detections
    metrics = json.loads((a / "eval" / "metrics.json").read_text())
    assert metrics["iteration"] == ITERS and metrics["images_seen"] == 4 * ITERS
    assert set(METRIC_NAMES) <= set(metrics)
    dets = json.loads((a / "eval" / "detections.json").read_text())
    image_ids = {d["image_id"] for d in dets}
    assert len(image_ids) > 8, "both ranks' shards should have detections"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "shapes" / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [metrics[k] for k in METRIC_NAMES] == pytest.approx([max(0.0, v) for v in ev.stats], abs=1e-12)


def test_one_host_read_per_pass(tmp_path):
    """Over whole training iterations (2 backward passes each, gradient clipping on), hvd_megdet's
    code (but the input pipeline, which never touches the device) reads tensors back to the host once per pass: the agreed status vector (losses, finite
    flags, BN group counts). On a GPU each read is a synchronisation."""
    overrides = small(tmp_path, iters=8) + ["solver.backward_passes_per_step=2", "solver.clip_grad_norm=5.0",
                                            "train.num_visualizations=0"]
    results = train_job(tmp_path, 2, "gloo", overrides, mode="host_reads")
    for r in results:
        reads = r["reads_per_iteration"]
        assert len(reads) == 4 and all(len(it) == 2 for it in reads), reads
        assert all(read.startswith("tolist at engine.py") for it in reads for read in it), reads


def stats_close(a: dict, b: dict, tol=1e-6) -> bool:
    return a.keys() == b.keys() and all(abs(x - y) <= tol * (1 + abs(y)) for k in a for x, y in zip(a[k], b[k]))


def mean_stats(per_rank: list[dict]) -> dict:
    return {k: [sum(v) / len(per_rank) for v in zip(*(r[k] for r in per_rank))] for k in per_rank[0]}


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_bn_groups_smaller_than_the_world(tmp_path, controller):
    """4 ranks in BN groups of 2: the groups' running statistics differ during training; every
    checkpoint and every evaluation holds their mean, the same on all ranks; the final
    checkpoint evaluated at other world sizes (1, 2, 3; evaluate.py and --eval-only) gives the
    run's AP."""
    overrides = small(tmp_path) + ["model.bn_group_size=2", "train.checkpoint_period=8", "train.eval_period=8",
                                   "train.keep_checkpoints=10", "train.num_visualizations=0"]
    results = train_job(tmp_path, 4, controller, overrides, mode="groups")
    run_dir = tmp_path / "runs" / "G"
    calls = [r["calls"] for r in results]
    assert len({len(c) for c in calls}) == 1 and len(calls[0]) == 4  # checkpoint + eval at 32 and 64 images
    assert [c["name"] for c in calls[0]] == ["bn_stats_checkpoint_32", "bn_stats_evaluation_32",
                                             "bn_stats_checkpoint_64", "bn_stats_evaluation_64"]
    for k in range(len(calls[0])):
        before = [c[k]["before"] for c in calls]
        assert before[0] == before[1] and before[2] == before[3]          # one statistic per group...
        if k % 2 == 0:                                                    # ...and after training steps,
            assert not stats_close(before[0], before[2], tol=1e-4)      # the groups' differ
        after = [c[k]["after"] for c in calls]
        assert all(a == after[0] for a in after)                         # the same on every rank
        assert stats_close(after[0], mean_stats(before))                 # = the mean of the ranks'
    by_name = {c["name"]: c["after"] for c in calls[0]}
    ckpts = checkpoint.list_checkpoints(run_dir)
    assert [p.name for p in ckpts] == [f"model_img{i:010d}.pth" for i in (32, 64)]
    for p in ckpts:
        saved = checkpoint.load(p)["model"]
        expected = by_name[f"bn_stats_checkpoint_{int(p.stem[len('model_img'):])}"]
        assert stats_close({k: saved[k].tolist() for k in expected}, expected, tol=0)
    evals = [r["evals"] for r in results]
    assert len(evals[0]) == 2 and all(e == evals[0] for e in evals)    # at 32 and 64 images, one model
    assert evals[0][-1] == results[0]["final"]
    if controller == "mpi":
        return  # the world-size sweep below does not depend on the training run's controller
    # the final checkpoint, evaluated elsewhere, reproduces the run's AP
    ap = json.loads((run_dir / "eval" / "metrics.json").read_text())["AP"]
    assert ap > 0
    for np_ in (1, 2, 3):
        for how in ("evaluate", "eval_only"):
            out = tmp_path / f"{how}-{np_}"
            if how == "evaluate":  # the documented order: CHECKPOINT --output-dir DIR key=value
                argv = [str(REPO / "scripts/evaluate.py"), str(ckpts[-1]), "--output-dir", str(out),
                        "train.num_visualizations=0"]
            else:  # --eval-only takes the output dir's latest checkpoint; options after overrides
                (out / "checkpoints").mkdir(parents=True)
                shutil.copy(ckpts[-1], out / "checkpoints")
                argv = [str(REPO / "scripts/train.py"), *overrides, "--eval-only", "--output-dir", str(out)]
            cmd = [sys.executable, *argv] if np_ == 1 else horovodrun_cmd(np_, "gloo", [sys.executable, *argv])
            res = run(cmd, timeout=180)
            assert res.returncode == 0, res.stdout
            got = json.loads((out / "eval" / "metrics.json").read_text())
            assert got["AP"] == pytest.approx(ap, abs=1e-6) and got["images_seen"] == 64, (np_, how, res.stdout)


def test_resume_on_other_world_sizes(tmp_path):
    """A run checkpointed at 2 ranks after 32 of 64 images, resumed with `train.py --resume` on 1
    and on 4 ranks: the same image count, the lr of that count, the schedule's total at the end."""
    first = tmp_path / "at2"
    args = small(tmp_path) + ["train.checkpoint_period=8", "train.keep_checkpoints=100",
                              "train.num_visualizations=0"]
    res = run(horovodrun_cmd(2, "mpi", [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(first),
                                        *args]), timeout=300)
    assert res.returncode == 0, res.stdout
    for world, batch, lr in ((1, 2, 0.01), (4, 8, 0.04)):   # peak lr 0.02 x batch / 4; 32 < 48: no decay yet
        out = tmp_path / f"at{world}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(first / "checkpoints" / "model_img0000000032.pth", out / "checkpoints")
        extra = ["train.checkpoint_minutes=0.001"] if world == 1 else []  # time-based checkpoints too
        argv = [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(out), "--resume", *args, *extra]
        res = run(argv if world == 1 else horovodrun_cmd(world, "mpi", argv), timeout=300)
        assert res.returncode == 0, res.stdout
        log = (out / "logs" / "rank-00000.log").read_text()
        m = re.search(r"resumed from .*model_img0000000032.pth: world size 2 -> (\d+), (\d+) images seen, "
                      r"iteration (\d+) of (\d+), lr ([\d.e-]+)", log)
        assert m, log
        assert (int(m[1]), int(m[2]), int(m[3]), int(m[4])) == (world, 32, 32 // batch, 64 // batch)
        assert float(m[5]) == pytest.approx(lr)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["images"] for r in recs] == [batch * r["iteration"] for r in recs]
        assert recs[-1]["images"] == 64 and recs[-1]["lr"] == pytest.approx(lr / 10)  # decayed at 48 images
        ckpts = [p.name for p in checkpoint.list_checkpoints(out)]
        assert ckpts[0] == "model_img0000000032.pth" and ckpts[-1] == "model_img0000000064.pth"
        if world == 1:
            assert len(ckpts) > 3, ckpts                                 # time-based, between the periods


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


def _foreign_checkpoint(root):
    """--resume from a checkpoint of another model: rank 0 finds out, every rank must say so."""
    import torch
    d = root.parent / "out" / "checkpoints"
    d.mkdir(parents=True)
    torch.save({"model": {"other.weight": torch.zeros(1)}, "optimizer": {}, "iteration": 1, "images": 4},
               d / "model_img0000000004.pth")
    return ["--resume"]


def _delete_image(root):
    (root / "val" / "000002.jpg").unlink()
    return []


def _bad_annotation(root):
    """Two annotations of the train file broken: the first named with its image, the other counted."""
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    coco["annotations"][1]["category_id"] = 999
    del coco["annotations"][3]["bbox"]
    (root / "annotations/bad_train.json").write_text(json.dumps(coco))
    return ["data.train_annotations=annotations/bad_train.json"]


def _truncate_train_images(root):
    """Every train JPEG cut in half: each rank meets one at its first batch (the files exist, so
    the start-up checks pass)."""
    for f in (root / "train").glob("*.jpg"):
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return ["data.workers=0"]  # a worker's error reaches the log wrapped over several lines


# case -> (prepare(root) -> extra overrides, what every rank must report)
CASES = {
    "missing_annotations": (lambda root: ["data.train_annotations=annotations/missing.json"],
                            "annotation file not found: .*missing.json"),
    "malformed_annotations": (_write_bad_json, "not valid JSON: .*bad.json"),
    "missing_image": (_delete_image, "000002.jpg"),
    "bad_annotation": (_bad_annotation, r"DataError: \S*bad_train.json: annotation id 2 \(image id \d+\): "
                                        r"category_id 999 is not in 'categories' \(1, 2, 3\); "
                                        r"1 more bad annotation: .*no 'bbox'"),
    "truncated_jpeg": (_truncate_train_images, r"DataError: cannot decode image \S*/train/\d+\.jpg "
                                               r"\(image id \d+\): image file is truncated"),
    "foreign_checkpoint": (_foreign_checkpoint, "CheckpointError: checkpoint .*model_img0000000004.pth does not fit"),
    "unknown_key": (lambda root: ["solver.learning_rate=0.1"], "solver.learning_rate"),
    "cuda_unusable": (lambda root: ["train.device=cuda"], "train.device=cuda: rank 0 on .*CUDA is not usable"),
    "bad_value": (lambda root: ["solver.images_per_rank=0"], "solver.images_per_rank"),
    "bn_group": (lambda root: ["model.bn_group_size=3"], "BN group size 3 does not divide the world size 2"),
    "bn_size": (lambda root: ["model.bn_size=3"], "model.bn_size.*multiple of solver.images_per_rank = 2"),
    "too_small": (lambda root: ["solver.images_per_rank=8"], "too small for one batch of 8 per rank on 2"),
    "unwritable_output": (lambda root: [], "cannot be written"),
    # a diverging run: every rank stops at the same iteration, naming it and the rank(s)
    "nonfinite_loss": (lambda root: ["solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=40",
                                     "solver.steps=[30]"], r"non-finite loss at iteration \d+ on rank\(s\) \["),
}


# cases every rank must end as a user error (exit 2: its status file says so) -> before the first iteration?
# every case is a user error (exit 2 on each rank: no restart can fix it) found before the first
# iteration, but an undecodable image met while training, and the diverging run (a crash)
CRASHES = {"nonfinite_loss"}
MET_WHILE_TRAINING = {"truncated_jpeg", "nonfinite_loss"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_every_rank(tmp_path, case):
    prepare, needle = CASES[case]
    root, coco_args = bad_fixture(tmp_path)
    args = coco_args + ["solver.max_iter=4", "solver.steps=[2]", "solver.images_per_rank=2"] + prepare(root)
    out = "/proc/hvd_megdet_cannot_write" if case == "unwritable_output" else str(tmp_path / "out")
    controller = ("gloo", "mpi")[sorted(CASES).index(case) % 2]
    cmd = horovodrun_cmd(2, controller, [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", out, *args])
    status = tmp_path / "status"
    res = run(cmd, timeout=180, env=launcher_env(extra={"HVD_MEGDET_STATUS_DIR": str(status)}))
    assert res.returncode != 0, res.stdout
    for r in range(2):
        assert re.search(f"rank {r}/2: .*{needle}", res.stdout), f"rank {r} did not report '{needle}':\n{res.stdout}"
    kind = "crash" if case in CRASHES else "user_error"
    assert sorted(p.name for p in status.glob("*.json")) == [f"{kind}-rank-00000.json",
                                                            f"{kind}-rank-00001.json"], res.stdout
    assert ("training from iteration" in res.stdout) == (case in MET_WHILE_TRAINING), res.stdout
    if case == "bn_group":  # found once the rank's log exists (BN groups are registered only when they fit)
        assert "BN group size 3 does not divide" in (tmp_path / "out" / "logs" / "rank-00001.log").read_text()


def test_unreadable_checkpoint_evaluated_fails_alike(tmp_path):
    """(One process.) engine.evaluate_checkpoint on a file rank 0 cannot read: a CheckpointError
    naming it, raised through the same broadcast every rank waits in (checkpoint.restore)."""
    from hvd_megdet import app, config
    from hvd_megdet.engine import evaluate_checkpoint
    cfg = config.load("shapes_tiny", small(tmp_path))
    out, log = app.start(cfg, str(tmp_path / "out"))
    bad = tmp_path / "model_img0000000008.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot read checkpoint {bad}"):
        evaluate_checkpoint(cfg, out, log, bad)
