"""Datasets checked at start-up: every bad annotation named (file, annotation id, image id, how
many more) as a DataError; unusable boxes counted; undecodable images as user errors while real
I/O errors stay crashes; scripts/check_dataset.py on the same cases. (train.py under horovodrun
on a bad annotation file and on truncated JPEGs: tests/test_train.py::test_bad_input_fails_every_rank.)"""
import errno
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hvd_megdet.data import shapes
from hvd_megdet.data.coco import CocoDetection, DataError, read_image
from hvd_megdet.errors import UserError
from tests.harness import REPO, run

SCRIPT = REPO / "scripts" / "check_dataset.py"
BAD = (-3, -2, -1)  # the annotations (images) broken in a case: the first is named, 2 more counted


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    return shapes.ensure(tmp_path_factory.mktemp("data") / "set", 6, 2, 64, seed=4)


def check_dataset_main(argv):
    """scripts/check_dataset.py's main() in this process (its CLI runs below as a subprocess too)."""
    spec = importlib.util.spec_from_file_location("check_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _set(key, value):
    def change(coco, a):
        a[key] = value(coco, a) if callable(value) else value
    return change


def _drop_bbox(coco, a):
    del a["bbox"]


# case -> (how to break each annotation at BAD, what the message says)
CASES = {
    "unknown_category_id": (_set("category_id", 999), r"category_id 999 is not in 'categories' \(1, 2, 3\)"),
    "bbox_three_numbers": (_set("bbox", lambda c, a: a["bbox"][:3]), r"bbox \[[^]]*\] is not four numbers"),
    "bbox_with_a_string": (_set("bbox", lambda c, a: ["1", *a["bbox"][1:]]),
                           r"bbox \['1', [^]]*\] is not four numbers"),
    "missing_bbox": (_drop_bbox, "no 'bbox'"),
    "nan_bbox": (_set("bbox", lambda c, a: [*a["bbox"][:3], float("nan")]),
                 r"bbox \[[^]]*, nan\] is not finite"),
    "infinite_bbox": (_set("bbox", lambda c, a: [float("inf"), *a["bbox"][1:]]),
                      r"bbox \[inf, [^]]*\] is not finite"),
    "unknown_image_id": (_set("image_id", 4242), r"image_id 4242 is not in 'images'"),
    "duplicate_annotation_id": (_set("id", lambda c, a: c["annotations"][0]["id"]),
                                "listed more than once in 'annotations'"),
}


def write_bad(shapes_set, tmp_path, case):
    coco = json.loads((shapes_set / "annotations/instances_train.json").read_text())
    if case == "duplicate_image_id":
        coco["images"] += [dict(coco["images"][k]) for k in BAD]
        first, needle = f"image id {coco['images'][BAD[0]]['id']}", "listed more than once in 'images'"
    else:
        change, needle = CASES[case]
        for k in BAD:
            change(coco, coco["annotations"][k])
        a = coco["annotations"][BAD[0]]
        first = f"annotation id {a['id']} \\(image id {a['image_id']}\\)"
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(coco))  # NaN and Infinity as Python's json writes (and reads) them
    return path, first, needle


@pytest.mark.parametrize("case", sorted([*CASES, "duplicate_image_id"]))
def test_bad_annotations_are_named_with_their_count(shapes_set, tmp_path, case, capsys):
    path, first, needle = write_bad(shapes_set, tmp_path, case)
    with pytest.raises(DataError) as e:
        CocoDetection(shapes_set / "train", path, train=True)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg, msg          # exit 2, one log line
    noun = "entries" if case == "duplicate_image_id" else "annotations"
    assert re.match(f"{re.escape(str(path))}: {first}: {needle}[^;|]*; 2 more bad {noun}: ", msg), msg
    assert len(re.findall(needle, msg)) == 3, msg                           # the other two quoted too
    # the same verdict from the checker, with every problem listed under its kind
    capsys.readouterr()
    assert check_dataset_main([path, shapes_set / "train"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"\n3 problem\(s\): \w", out) and len(re.findall(needle, out)) == 3, out
    assert "summary: skipped" in out


def test_annotation_file_problems_and_counted_drops(shapes_set, tmp_path, capsys):
    assert check_dataset_main([tmp_path / "nope.json", shapes_set / "train"]) == 2
    assert "annotation file not found" in capsys.readouterr().out
    coco = json.loads((shapes_set / "annotations/instances_train.json").read_text())
    last = coco["images"][-1]["id"]
    n_last = sum(a["image_id"] == last for a in coco["annotations"])
    for a in coco["annotations"]:
        if a["image_id"] == last:
            a["bbox"] = [70, 10, 5, 5]                                    # outside the 64 px image
    nid = max(a["id"] for a in coco["annotations"])
    coco["annotations"] += [
        {"id": nid + 1, "image_id": 1, "category_id": 2, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 1},
        {"id": nid + 2, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0.5, 20], "area": 10, "iscrowd": 0}]
    path = tmp_path / "drops.json"
    path.write_text(json.dumps(coco))
    ds = CocoDetection(shapes_set / "train", path, train=True)
    kept = len(coco["annotations"]) - n_last - 2
    assert ds.stats == {"images": 6, "images_used": 5, "boxes_kept": kept, "dropped_crowd": 1,
                        "dropped_degenerate": n_last + 1, "images_without_box": 1}
    assert f"6 images, {kept} boxes kept, dropped 1 crowd + {n_last + 1} degenerate" in ds.summary()
    assert "1 images without a usable box (not trained on)" in ds.summary()
    assert len(CocoDetection(shapes_set / "train", path, train=False)) == 6  # evaluation keeps every image


def test_undecodable_images_are_user_errors_io_errors_crashes(shapes_set, tmp_path):
    images = tmp_path / "train"
    shutil.copytree(shapes_set / "train", images)
    ds = CocoDetection(images, shapes_set / "annotations/instances_train.json", train=True)
    names = [ds.coco.imgs[i]["file_name"] for i in ds.ids]
    truncate(images / names[1])
    (images / names[2]).write_bytes(b"not a JPEG at all" * 20)
    ds[0]                                                                 # the others still read
    for k, why in ((1, "image file is truncated"), (2, "cannot identify image file")):
        with pytest.raises(DataError, match=f"cannot decode image {re.escape(str(images / names[k]))} "
                                            f"\\(image id {ds.ids[k]}\\): .*{why}"):
            ds[(k, 0)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, sampler=[(1, 0)])
    with pytest.raises(DataError, match=f"Caught DataError in DataLoader worker(.|\n)*{names[1]}"):
        next(iter(loader))                                                # still a user error from a worker
    with pytest.raises(OSError) as e:                 # a real EIO (/proc/self/mem read at offset 0):
        read_image(Path("/proc/self/mem"), 7)         # the filesystem failed, not the file: a crash
    assert e.value.errno == errno.EIO and not isinstance(e.value, UserError)


def test_check_dataset_cli(shapes_set, tmp_path):
    """Plain python, one process: exit 0 on the clean set (decoded); exit 2 naming a truncated JPEG
    (only --decode finds it) and an image missing from the folder."""
    argv = [sys.executable, str(SCRIPT), str(shapes_set / "annotations/instances_train.json")]
    res = run(argv + [str(shapes_set / "train"), "--decode", "--threads", "2"], timeout=120)
    assert res.returncode == 0 and "no problems in" in res.stdout, res.stdout
    assert re.search(r"instances_train.json: 6 images, \d+ boxes kept, dropped 0 crowd \+ 0 degenerate",
                     res.stdout), res.stdout
    images = tmp_path / "train"
    shutil.copytree(shapes_set / "train", images)
    truncate(images / "000002.jpg")
    (images / "000004.jpg").unlink()
    res = run(argv + [str(images), "--decode", "--threads", "2"], timeout=120)
    assert res.returncode == 2, res.stdout
    assert re.search(r"1 problem\(s\): missing image file\n  image id 5: .*000004.jpg not found",
                     res.stdout), res.stdout
    assert re.search(r"1 problem\(s\): undecodable image\n  cannot decode image .*000002.jpg \(image id 3\): "
                     r"image file is truncated", res.stdout), res.stdout
    assert "decoding: 100%" in res.stdout                                  # the progress bar (stderr)
