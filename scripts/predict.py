#!/usr/bin/env python
"""Detect objects in images with a trained checkpoint:
    [horovodrun -np N] python scripts/predict.py CHECKPOINT INPUT... [--output-dir DIR]
        [--score-thresh 0.5] [key=value ...]

INPUT: image files, folders (their files) or quoted globs ('photos/**/*.jpg'). Writes
DIR/predictions.json (COCO results + file_name, category_name) and DIR/images/<id>_<name>.png
with the boxes drawn. DIR defaults to <the checkpoint's run folder>/predictions. Unreadable
inputs are named and skipped; none readable is a user error (exit 2).
"""
import argparse

from hvd_megdet import app, predict


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", metavar="INPUT [key=value]",
                   help="images, folders, globs; section.key=value items override the checkpoint's config")
    p.add_argument("--output-dir", default=None, help="default: <the checkpoint's run folder>/predictions")
    p.add_argument("--score-thresh", type=float, default=0.5,
                   help="keep (and draw) detections scoring at least this (default 0.5)")
    args = p.parse_intermixed_args()  # options, inputs and overrides in any order
    inputs, overrides = predict.split_arguments(args.inputs)
    if not inputs:
        p.error("no INPUT given (only key=value overrides)")
    return predict.run(args.checkpoint, inputs, args.output_dir, args.score_thresh, overrides)


if __name__ == "__main__":
    app.run(main)
