#!/usr/bin/env python
"""Check a COCO-format detection set before training on it (one process, no Horovod):

    python scripts/check_dataset.py ANNOTATIONS IMAGE_DIR [--decode] [--threads N]

Runs the checks train.py makes at start-up (hvd_megdet/data/coco.py: ids unique, every bbox four
finite numbers, every category_id and image_id known), prints the box summary train.py logs,
reports every image listed but missing from IMAGE_DIR and, with --decode, every image that does
not fully decode (truncated, corrupt, not an image). Lists the first 50 problems of each kind
with counts. Exit code 0: clean; 2: problems found.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tqdm import tqdm  # noqa: E402

from hvd_megdet.data.annotations import DataError, annotation_problems, coco_from, read_annotations  # noqa: E402
from hvd_megdet.data.coco import CocoDetection, missing_image_files, read_image  # noqa: E402
from hvd_megdet.errors import EXIT_OK, EXIT_USER_ERROR  # noqa: E402

LISTED = 50  # problems printed per kind


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", type=Path, help="COCO instances JSON, e.g. instances_train2017.json")
    p.add_argument("image_dir", type=Path, help="the folder the images' file_name are relative to")
    p.add_argument("--decode", action="store_true", help="also open and fully decode every image")
    p.add_argument("--threads", type=int, default=16, help="threads for stat and decode (default 16)")
    return p.parse_args(argv)


def image_files(dataset: dict) -> list[tuple[object, str]]:
    """(image id, file_name) of the image entries that name a file."""
    return [(im.get("id"), im["file_name"]) for im in dataset["images"]
            if isinstance(im, dict) and isinstance(im.get("file_name"), str) and im["file_name"]]


def decode_problem(path: Path, image_id) -> tuple[str, str] | None:
    """What training would meet reading this image, or None: the same read_image as training."""
    try:
        read_image(path, image_id)
    except DataError as e:
        return "undecodable image", str(e)
    except OSError as e:  # training would crash (and be restarted) here: worth knowing now
        return "I/O error", f"cannot read image {path} (image id {image_id}): {e}"
    return None


def find_problems(args) -> list[tuple[str, str]]:
    dataset = read_annotations(args.annotations)
    problems = annotation_problems(dataset)
    if problems:
        print("summary: skipped until the annotation problems below are fixed")
    else:
        print(CocoDetection(args.image_dir, args.annotations, train=True, coco=coco_from(dataset)).summary())
    if not args.image_dir.is_dir():
        return problems + [("image folder", f"image folder not found: {args.image_dir}")]
    files = image_files(dataset)
    missing = set(missing_image_files(args.image_dir, [f for _, f in files], args.threads))
    problems += [("missing image file", f"image id {i}: {args.image_dir / f} not found")
                 for i, f in files if f in missing]
    if args.decode:
        present = [(args.image_dir / f, i) for i, f in files if f not in missing]
        with ThreadPoolExecutor(args.threads) as pool:  # PIL's decoders release the GIL
            found = pool.map(lambda item: decode_problem(*item), present)
            problems += [p for p in tqdm(found, total=len(present), desc="decoding", unit="image") if p]
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        problems = find_problems(args)
    except DataError as e:  # the annotation file itself: missing, not JSON, not COCO
        problems = [("annotation file", str(e))]
    by_kind: dict[str, list[str]] = {}
    for kind, text in problems:
        by_kind.setdefault(kind, []).append(text)
    for kind, texts in by_kind.items():
        print(f"\n{len(texts)} problem(s): {kind}")
        for text in texts[:LISTED]:
            print(f"  {text}")
        if len(texts) > LISTED:
            print(f"  ... and {len(texts) - LISTED} more")
    if problems:
        print(f"\n{len(problems)} problem(s) in {args.annotations} / {args.image_dir}")
        return EXIT_USER_ERROR
    print(f"no problems in {args.annotations} / {args.image_dir}"
          + ("" if args.decode else " (images not decoded: --decode)"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
