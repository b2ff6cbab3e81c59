#!/usr/bin/env python
"""Per-rank data startup on a COCO-sized annotation file (118,287 images, ~7.3 boxes each, as
train2017): parsing it with pycocotools, the per-rank check of every image file that each rank
used to make (serial stats), and the check that replaces it, made once on rank 0 in threads.

    python scripts/experiments/benchmark_startup.py [--images 118287] [--workdir /tmp/hvd_megdet_startup] [--quick]

Prints a table and writes benchmarks/startup.json. The image files are empty placeholders: only
their existence is checked at startup (images are read later by the DataLoader).
"""
import argparse
import json
import os
import random
import time
from pathlib import Path

from hvd_megdet.data.coco import CocoDetection

from common import REPO


def generate(root: Path, n: int) -> Path:
    ann = root / "annotations" / f"instances_{n}.json"
    if ann.is_file():
        return ann
    rng = random.Random(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        for _ in range(rng.randint(1, 14)):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.randint(1, 80), "iscrowd": 0,
                         "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], "area": bw * bh})
        (root / "images" / images[-1]["file_name"]).touch()
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--workdir", default="/tmp/hvd_megdet_startup")
    p.add_argument("--quick", action="store_true", help="5000 images (a smoke test of the script)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "startup.json"))
    args = p.parse_args()
    n = 5000 if args.quick else args.images
    root = Path(args.workdir)
    ann, t_gen = timed(lambda: generate(root, n))
    ds, t_parse = timed(lambda: CocoDetection(root / "images", ann, train=True))
    names = [str(ds.image_dir / ds.coco.imgs[i]["file_name"]) for i in ds.ids]
    _, t_serial = timed(lambda: [os.path.isfile(f) for f in names])   # what every rank did before
    problem, t_threads = timed(lambda: ds.missing_files(threads=32))  # now: rank 0 only
    assert problem is None, problem
    res = {"images": len(ds), "annotations": len(ds.coco.anns), "annotation_mb": ann.stat().st_size / 2**20,
           "parse_s": t_parse, "serial_stat_s": t_serial, "threaded_stat_s": t_threads,
           "per_rank_before_s": t_parse + t_serial, "per_rank_after_s": t_parse,
           "rank0_after_s": t_parse + t_threads,
           "filesystem_stats_before_at_128_ranks": 128 * len(ds), "filesystem_stats_after": len(ds),
           "note": "local disk, warm page cache; on a shared filesystem each stat is a metadata round trip"}
    print(f"{len(ds)} images, {res['annotations']} boxes, {res['annotation_mb']:.0f} MB annotation file "
          f"(generated in {t_gen:.1f} s)")
    print(f"parse (pycocotools + filtering)  {t_parse:7.2f} s   every rank, before and after")
    print(f"stat every image, serial         {t_serial:7.2f} s   every rank, before")
    print(f"stat every image, 32 threads     {t_threads:7.2f} s   rank 0 only, after")
    print(f"per-rank startup: {res['per_rank_before_s']:.2f} s -> {res['per_rank_after_s']:.2f} s; "
          f"filesystem stats for 128 ranks: {128 * len(ds)} -> {len(ds)}")
    if not args.quick:
        Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
