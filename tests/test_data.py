"""Sampler disjointness / equal lengths / resume, and COCO loading + filtering through pycocotools."""
import itertools
import json

import pytest
import torch

from hvd_megdet.data import shapes
from hvd_megdet.data.coco import CocoDetection, DataError
from hvd_megdet.data.sampler import DatasetTooSmall, DistributedGroupedBatchSampler
from hvd_megdet.data.transforms import TrainTransform


def make_samplers(n, world, batch, ratios=None, seed=3, start=0):
    ratios = ratios or [1.5 if i % 3 else 0.7 for i in range(n)]
    return [DistributedGroupedBatchSampler(ratios, batch, r, world, seed, start_images=start) for r in range(world)]


def consume(samplers, steps):
    """``steps`` global passes: every rank's next batch. Returns [(stream position, index)] in
    stream order (the flip seed encodes the position)."""
    streams = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        for st in streams:
            out += [(seed - samplers[0].seed * 2**40, i) for i, seed in next(st)]
    return out


@pytest.mark.parametrize("n", [9, 17, 33, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ranks_take_disjoint_slices_of_one_stream(n, world):
    batch = 2
    if n < batch * world:
        with pytest.raises(DatasetTooSmall, match=f"{n} images is too small"):
            make_samplers(n, world, batch)
        return
    samplers = make_samplers(n, world, batch)
    steps = 3 * n // (batch * world) + 1                                # three epochs and a bit
    seen = consume(samplers, steps)
    assert [p for p, _ in seen] == list(range(steps * batch * world))   # contiguous, no overlap
    for e in range(3):                                                  # each epoch: every image once
        assert sorted(i for p, i in seen if e * n <= p < (e + 1) * n) == list(range(n))
    assert samplers[0].epoch_order(0) != samplers[0].epoch_order(1)     # reshuffled per epoch


def test_aspect_ratio_grouping():
    ratios = [2.0 if i % 2 else 0.5 for i in range(1000)]
    for world in (1, 2, 3):
        batches = [b for s in make_samplers(1000, world, 4, ratios) for b in itertools.islice(iter(s), 200)]
        mixed = sum(len({ratios[i] >= 1 for i, _ in b}) > 1 for b in batches)
        assert mixed <= 0.05 * len(batches), (world, mixed)            # only where a slice crosses a run


@pytest.mark.parametrize("n", [33, 101, 250])
@pytest.mark.parametrize("before, after, batch, steps", [
    (2, 1, 2, 5), (2, 4, 2, 7), (4, 3, 2, 9), (1, 8, 2, 3), (8, 2, 4, 1), (3, 5, 1, 11)])
def test_resume_on_another_world_size_repeats_and_skips_nothing(n, before, after, batch, steps):
    """Interrupted after ``steps`` passes on ``before`` ranks, resumed at the same image count on
    ``after`` ranks: the stream continues at the same position, same images, same flips."""
    if n < batch * max(before, after):
        pytest.skip("dataset smaller than one global batch")
    first = consume(make_samplers(n, before, batch), steps)
    resumed_at = steps * batch * before
    epoch = resumed_at // n
    rest = consume(make_samplers(n, after, batch, start=resumed_at), (2 * n) // (batch * after) + 1)
    seen = first + rest
    positions = [p for p, _ in seen]
    assert positions == list(range(len(seen)))                          # nothing repeated or skipped
    in_epoch = [i for p, i in seen if epoch * n <= p < (epoch + 1) * n]
    assert sorted(in_epoch) == list(range(n))                           # the interrupted epoch: each image once
    uninterrupted = consume(make_samplers(n, 1, 1), len(seen))
    assert seen == uninterrupted                                        # the order is world-size independent


def write_fixture(tmp_path):
    """Non-contiguous category ids, a crowd box, a degenerate box, an image with nothing usable."""
    shapes.ensure(tmp_path / "set", 4, 2, 64, seed=5)
    root = tmp_path / "set"
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    coco["categories"] = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 11, "name": "c"}]
    remap = {1: 3, 2: 7, 3: 11}
    for a in coco["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 4]
    nid = max(a["id"] for a in coco["annotations"]) + 1
    coco["annotations"] += [
        {"id": nid, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 1},
        {"id": nid + 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 20], "area": 0, "iscrowd": 0},
        {"id": nid + 2, "image_id": 4, "category_id": 11, "bbox": [70, 70, 5, 5], "area": 25, "iscrowd": 0},
    ]
    path = root / "annotations/fixture.json"
    path.write_text(json.dumps(coco))
    return root, path, coco


def test_coco_loading_and_filtering(tmp_path):
    root, ann, coco = write_fixture(tmp_path)
    ds = CocoDetection(root / "train", ann, train=True, transform=TrainTransform(0.0))
    assert ds.ids == [1, 2, 3]  # image 4 only has a box outside the image: dropped for training
    assert ds.label_to_cat == {1: 3, 2: 7, 3: 11} and ds.num_classes == 4
    img, target = ds[0]
    usable = [a for a in coco["annotations"] if a["image_id"] == 1 and not a["iscrowd"] and a["bbox"][2] > 0]
    assert target["boxes"].shape == (len(usable), 4)
    assert sorted(target["labels"].tolist()) == sorted(ds.cat_to_label[a["category_id"]] for a in usable)
    x, y, w, h = usable[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8  # float on the device (transforms.image_to_device)
    val = CocoDetection(root / "train", ann, train=False)
    assert val.ids == [1, 2, 3, 4]


def test_flip_is_exact_and_seeded(tmp_path):
    root, ann, _ = write_fixture(tmp_path)
    plain = CocoDetection(root / "train", ann, train=True, transform=TrainTransform(0.0))
    flip = CocoDetection(root / "train", ann, train=True, transform=TrainTransform(1.0))
    (a, ta), (b, tb) = plain[(0, 1)], flip[(0, 1)]
    assert torch.equal(b, a.flip(-1))
    assert torch.allclose(tb["boxes"][:, 0], 64 - ta["boxes"][:, 2])
    half = CocoDetection(root / "train", ann, train=True, transform=TrainTransform(0.5))
    again = CocoDetection(root / "train", ann, train=True, transform=TrainTransform(0.5))
    flips = [torch.equal(half[(0, seed)][0], b) for seed in range(200)]
    assert 0.38 < sum(flips) / len(flips) < 0.62                    # the flip rate is hflip_prob
    for seed in range(20):                                          # a decision depends on its seed only
        assert torch.equal(half[(0, seed)][0], again[(0, seed)][0])


def test_bad_files_are_named(tmp_path):
    root, ann, coco = write_fixture(tmp_path)
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        CocoDetection(root / "train", root / "nope.json", train=True)
    bad = root / "annotations/bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON: .*bad.json"):
        CocoDetection(root / "train", bad, train=True)
    (root / "train" / "000001.jpg").unlink()
    ds = CocoDetection(root / "train", ann, train=True)              # parsing alone never stats images
    assert "000001.jpg" in ds.missing_files(threads=4)
    with pytest.raises(DataError, match="cannot read image .*000001.jpg"):  # and lazily, by name
        ds[[ds.coco.imgs[i]["file_name"] for i in ds.ids].index("000001.jpg")]
    assert "image folder not found" in CocoDetection(root / "nowhere", ann, train=True).missing_files()


def test_shapes_generator_deterministic(tmp_path):
    a = shapes.ensure(tmp_path / "a", 6, 2, 96, seed=1)
    b = shapes.ensure(tmp_path / "b", 6, 2, 96, seed=1)
    ja = json.loads((a / "annotations/instances_train.json").read_text())
    jb = json.loads((b / "annotations/instances_train.json").read_text())
    assert ja["annotations"] == jb["annotations"] and len(ja["categories"]) >= 3
    per_image = {}
    for x in ja["annotations"]:
        per_image[x["image_id"]] = per_image.get(x["image_id"], 0) + 1
    assert all(1 <= v <= 6 for v in per_image.values())
    assert (a / "train" / "000000.jpg").read_bytes() == (b / "train" / "000000.jpg").read_bytes()


def test_shapes_wide_images(tmp_path):
    """data.shapes_width: images height x width (COCO's 800 x 1216 for GPU timings), every box inside,
    recorded sizes equal to the files'; the square default is unchanged (its cache name too)."""
    from PIL import Image
    root = shapes.ensure(tmp_path / "wide", 5, 2, 64, seed=3, width=150)
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert set(sizes.values()) == {(150, 64)}
    assert Image.open(root / "train" / "000000.jpg").size == (150, 64)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 150 and y + h <= 64
    assert max(a["bbox"][0] + a["bbox"][2] for a in coco["annotations"]) > 64  # the width is used
    assert shapes.default_root(8, 2, 64, 0).name == "shapes-v2-8-2-64px-seed0"
    assert shapes.default_root(8, 2, 64, 0, width=150).name == "shapes-v2-8-2-64x150px-seed0"
