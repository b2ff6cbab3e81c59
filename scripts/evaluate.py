#!/usr/bin/env python
"""Evaluate a checkpoint on the val set (COCO bbox):
    [horovodrun -np N] python scripts/evaluate.py CHECKPOINT [--output-dir DIR] [key=value ...]

The config comes from the checkpoint; key=value overrides apply on top (e.g. data.root=...).
"""
import argparse
from pathlib import Path

from hvd_megdet import app, checkpoint, config
from hvd_megdet.engine import evaluate_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", default=None, help="default: the checkpoint's run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()  # options and overrides in any order
    ckpt = Path(args.checkpoint)
    state = checkpoint.load(ckpt)  # every rank: a missing or corrupt file fails everywhere alike
    cfg = config.from_dict(state["config"], args.overrides)
    out, log = app.start(cfg, args.output_dir or ckpt.resolve().parent.parent, write_config=False)
    evaluate_checkpoint(cfg, out, log, ckpt, state)  # no BN groups: any world size
    return 0


if __name__ == "__main__":
    app.run(main)
