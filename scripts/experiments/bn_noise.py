#!/usr/bin/env python
"""How noisy is a BN statistic over k images of the miniature? MegDet's BN-size finding rests on it.
    python scripts/experiments/bn_noise.py [--images 400] [--output benchmarks/megdet_bn_noise.json]
For every BatchNorm of the pretrained backbone (the one the grid starts from), on the detector's own
input (the shapes training images through the model's transform): per channel, the share of the
feature's standard deviation that lies BETWEEN images, r = sd_i(per-image mean) / sd(all values).
A BN mean over k images is then off by r / sqrt(k) standard deviations (1 / sqrt(k * H * W) if the
positions of an image were independent). Measured at the start of fine-tuning, in one process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import REPO

from hvd_megdet import config, data, model as model_lib, pretrain
from hvd_megdet.data.transforms import image_to_device


def between_image_share(means: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """Per channel, sd over images of the per-image mean / sd over every value. ``means`` and
    ``squares``: [images, channels] per-image E[x] and E[x^2] (every image has the same size)."""
    total_var = squares.mean(0) - means.mean(0) ** 2
    return (means.var(0) / total_var.clamp_min(1e-12)).sqrt()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--output", default=str(REPO / "benchmarks/megdet_bn_noise.json"))
    args = ap.parse_args(argv)
    if args.images < 2:
        ap.error(f"--images {args.images}: at least 2 (a spread between images)")
    folder = pretrain.weights_dir(pretrain.DEFAULT, 2)
    info = pretrain.read_info(folder)
    if info is None:
        print(f"no pretrained backbone in {folder}: run scripts/experiments/reproduce_megdet.py (or scripts/pretrain_backbone.py) first",
              file=sys.stderr)
        return 2
    # no random flips: the same figures on every run
    cfg = config.load("shapes_tiny", ["model.norm=bn", "data.hflip_prob=0",
                                      f"model.backbone_weights={info['path']}"])
    data.prepare(cfg.data)
    ds = data.train_dataset(cfg.data)
    net = model_lib.build_model(cfg, num_classes=len(ds.cat_ids) + 1).eval()
    stats = {}  # BN name -> (per-image channel means [N, C], per-image E[x^2] [N, C], positions per image)

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].double()
            s = stats.setdefault(name, [[], [], x.shape[-1] * x.shape[-2]])
            s[0].append(x.mean((2, 3)))
            s[1].append((x * x).mean((2, 3)))
        return record
    for name, m in net.backbone.body.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(hook(name))
    n = min(args.images, len(ds))
    with torch.no_grad():
        for i in range(n):
            image, _ = ds[i]
            batch, _ = net.transform([image_to_device(image, torch.device("cpu"))])
            net.backbone.body(batch.tensors)
    layers = []
    for name, (means, squares, positions) in stats.items():
        r = between_image_share(torch.cat(means), torch.cat(squares))
        layers.append({"bn": name, "positions_per_image": positions, "r_mean": float(r.mean()),
                       "r_max": float(r.max()), "mean_error_sd_at_2": float(r.mean() / 2 ** 0.5),
                       "independent_positions_at_2": (2 * positions) ** -0.5})
    out = {"images": n, "backbone": info["path"], "layers": layers}
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'BN layer':28} {'HxW':>5} {'r mean':>7} {'r max':>6} {'err@2':>6} {'iid@2':>6}")
    for l in layers:
        print(f"{l['bn']:28} {l['positions_per_image']:5d} {l['r_mean']:7.3f} {l['r_max']:6.3f} "
              f"{l['mean_error_sd_at_2']:6.3f} {l['independent_positions_at_2']:6.3f}")
    print(f"saved {args.output} ({n} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
