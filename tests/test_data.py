"""Sampler disjointness / equal lengths / resume, and COCO loading + filtering through pycocotools."""
import json

import pytest
import torch

from hvd_megdet.data import shapes
from hvd_megdet.data.coco import CocoDetection, DataError
from hvd_megdet.data.sampler import DatasetTooSmall, DistributedGroupedBatchSampler
from hvd_megdet.data.transforms import TrainTransform


def make_samplers(n, world, batch, ratios=None, seed=3):
    ratios = ratios or [1.5 if i % 3 else 0.7 for i in range(n)]
    return [DistributedGroupedBatchSampler(ratios, batch, r, world, seed) for r in range(world)]


@pytest.mark.parametrize("n", [9, 17, 33, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shards_disjoint_equal_length(n, world):
    batch = 2
    if n // world < batch:
        with pytest.raises(DatasetTooSmall, match=f"{n} images is too small"):
            make_samplers(n, world, batch)
        return
    samplers = make_samplers(n, world, batch)
    for epoch in range(3):
        per_rank = [s.epoch_batches(epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1                     # same iterations everywhere
        assert len(per_rank[0]) == (n // world) // batch
        flat = [i for b in per_rank for batch_ in b for i in batch_]
        assert len(flat) == len(set(flat))                              # disjoint
        assert all(len(b) == batch for bs in per_rank for b in bs)
    assert samplers[0].shard(0) != samplers[0].shard(1)                 # reshuffled per epoch


def test_aspect_ratio_grouping():
    ratios = [2.0 if i % 2 else 0.5 for i in range(64)]
    (s,) = make_samplers(64, 1, 4, ratios)
    batches = s.epoch_batches(0)
    pure = sum(len({ratios[i] >= 1 for i in b}) == 1 for b in batches)
    assert pure >= len(batches) - 1  # at most the leftover batch mixes groups


def test_resume_position_and_flip_seeds():
    s = make_samplers(40, 2, 2)[1]
    stream = iter(s.batches(0))
    first = [next(stream) for _ in range(25)]           # crosses an epoch boundary (10 per epoch)
    resumed = iter(s.batches(13))
    assert [next(resumed) for _ in range(12)] == first[13:]
    seeds = [seed for b in first for _, seed in b]
    assert len(seeds) == len(set(seeds))


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
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
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
    assert torch.equal(half[(0, 123)][0], half[(0, 123)][0])  # same seed, same decision


def test_bad_files_are_named(tmp_path):
    root, ann, coco = write_fixture(tmp_path)
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        CocoDetection(root / "train", root / "nope.json", train=True)
    bad = root / "annotations/bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON: .*bad.json"):
        CocoDetection(root / "train", bad, train=True)
    (root / "train" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg"):
        CocoDetection(root / "train", ann, train=True)


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
