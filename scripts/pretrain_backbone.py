#!/usr/bin/env python
"""Pretrain the detector's TinyResNet body on a generated classification task (the miniature's ImageNet).

    horovodrun -np 2 python scripts/pretrain_backbone.py [--quick] [--seed 0] [--iterations N] [--print-path]

Writes $HVD_MEGDET_CACHE/<key>/weights.pth (a state dict for model.backbone_weights=PATH, BN running
statistics included) and weights.json (held-out accuracy, wall time, recipe, digest); the key names
the recipe and the world size. Reused if present. See hvd_megdet/pretrain.py for the task.
"""
from hvd_megdet import signals

signals.stop_flag()  # before the heavy imports, as scripts/train.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

from hvd_megdet import app, dist, pretrain  # noqa: E402
from hvd_megdet import log as log_mod  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny recipe (seconds), for the tests")
    for f in dataclasses.fields(pretrain.Recipe):
        if f.name != "widths":
            default, quick = getattr(pretrain.DEFAULT, f.name), getattr(pretrain.QUICK, f.name)
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                           help=f"default {default} (--quick: {quick})")
    p.add_argument("--widths", type=int, nargs=4, default=None, help="model.tiny_widths (default: shapes_tiny's)")
    p.add_argument("--print-path", metavar="WORLD_SIZE", type=int, default=None,
                   help="print the weights file of this recipe on WORLD_SIZE ranks and exit (no training)")
    return p.parse_args()


def recipe_from(args) -> pretrain.Recipe:
    base = pretrain.QUICK if args.quick else pretrain.DEFAULT
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name) is not None}
    if "widths" in changes:
        changes["widths"] = tuple(changes["widths"])
    return dataclasses.replace(base, **changes)


def main(args) -> int:
    recipe = recipe_from(args)
    folder = pretrain.weights_dir(recipe, dist.size())
    log = log_mod.setup(folder.parent / "logs" / folder.name, dist.rank())
    # rank 0 decides, so that every rank takes the same path even if another job is writing it now
    info = dist.broadcast_object(pretrain.read_info(folder) if dist.is_main() else None, name="pretrain_cached")
    if info is None:
        log.info("pretraining %s on %d ranks: %s", folder.name, dist.size(), recipe)
        state, report = pretrain.train(recipe, log)
        if dist.is_main():
            info = pretrain.save(folder, state, report)
        dist.barrier()  # the others return only once the file is there
    elif dist.is_main():
        log.info("reusing %s", folder)
    if dist.is_main():
        print(f"backbone weights: {folder / pretrain.WEIGHTS_FILE}\n"
              f"held-out accuracy {info['heldout_accuracy']:.3f} (chance {info['chance']:.3f}), "
              f"trained in {info['wall_s']:.0f} s on {info['world_size']} ranks", flush=True)
        print("pretrain " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.print_path:
        print(pretrain.weights_dir(recipe_from(ARGS), ARGS.print_path) / pretrain.WEIGHTS_FILE)
        raise SystemExit(0)
    app.run(lambda: main(ARGS))
