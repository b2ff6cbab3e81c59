#!/usr/bin/env python
"""MegDet's findings in miniature: a grid of real training jobs on the embedded shapes data.

    python scripts/reproduce_megdet.py [--output-dir outputs/megdet_miniature] [--images 4000] [--quick]

Every cell is `horovodrun -np N python scripts/train.py --config shapes_tiny ...` (ranks
oversubscribe this machine's cores) trained on the SAME number of images, with the linear
scaling rule (lr 0.01 per 8 images) and a schedule given in images (warmup over the first 20 %,
lr x0.1 at 79 % and 94 %), evaluated on the same 100 val images. The axes (MegDet sections 3-4):

  cgbn      Cross-GPU BN over all ranks, warmup, mini-batch 8 -> 16 -> 32 -> 64
  nobn      no batch statistics (model.norm=frozen: fixed affine, nothing normalised), warmup,
            same batches; plus half the lr at the two largest
  nowarmup  the largest mini-batch with CGBN and no warmup
  bnsize    mini-batch 32 (8 ranks x 4 images) with BN groups of 1, 2, 4, 8 ranks (BN size 4-32)
  seed      the 8-image CGBN baseline with two more seeds (seed noise)

A cell diverged if training stopped on a non-finite loss, or if its loss blew up (a logged loss
above 3x the first one). Finished cells are skipped (resumable); each has a time limit. Writes
OUTPUT_DIR/<cell>/cell.json, and benchmarks/megdet_miniature.{json,png} (--quick: in OUTPUT_DIR).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# 0.01 per 8 images, half the demo's 0.02: a first grid with 0.02 and a 10 % warmup diverged at
# mini-batch 32 even with CGBN (lr 0.08, 12 warmup iterations), leaving the BN-size axis empty.
BASE_LR, REFERENCE = 0.01, 8
WARMUP_FRACTION = 0.2


def cell(name, group, ranks, per_rank, norm="syncbn", bn_ranks=0, lr_scale=1.0, warmup=True, seed=42):
    return {"name": name, "group": group, "ranks": ranks, "images_per_rank": per_rank,
            "mini_batch": ranks * per_rank, "norm": norm, "bn_group_ranks": (bn_ranks or ranks) if norm == "syncbn" else 0,
            "lr_scale": lr_scale, "warmup": warmup, "seed": seed}


def grid(quick: bool) -> list[dict]:
    if quick:  # two tiny cells: one that trains, one that must diverge
        return [cell("quick_cgbn_b4", "cgbn", 2, 2),
                cell("quick_nobn_lr1000", "nobn", 2, 2, norm="frozen", lr_scale=1000.0, warmup=False)]
    cells = []
    for ranks, per in ((2, 4), (4, 4), (8, 4), (8, 8)):
        cells.append(cell(f"cgbn_b{ranks * per}", "cgbn", ranks, per))
        cells.append(cell(f"nobn_b{ranks * per}", "nobn", ranks, per, norm="frozen"))
    cells += [cell("nobn_b32_halflr", "nobn", 8, 4, norm="frozen", lr_scale=0.5),
              cell("nobn_b64_halflr", "nobn", 8, 8, norm="frozen", lr_scale=0.5),
              cell("cgbn_b64_nowarmup", "nowarmup", 8, 8, warmup=False)]
    cells += [cell(f"bnsize_b32_bn{4 * g}", "bnsize", 8, 4, bn_ranks=g) for g in (1, 2, 4)]
    cells += [cell(f"seed_b8_s{s}", "seed", 2, 4, seed=s) for s in (1, 2)]
    return cells


def overrides(c: dict, images: int) -> list[str]:
    iters = images // REFERENCE  # configured iterations are at the reference batch (8 images)
    ov = [f"solver.images_per_rank={c['images_per_rank']}", f"solver.reference_batch={REFERENCE}",
          f"solver.base_lr={BASE_LR * c['lr_scale']}", f"solver.max_iter={iters}",
          f"solver.steps=[{min(round(iters * 0.79), iters - 2)},{min(round(iters * 0.94), iters - 1)}]",
          f"solver.warmup_iters={max(1, round(iters * WARMUP_FRACTION)) if c['warmup'] else 0}",
          f"model.norm={c['norm']}",
          f"train.seed={c['seed']}", "train.checkpoint_period=1000000", "train.checkpoint_minutes=0",
          f"train.log_period={max(1, 40 // c['mini_batch'])}", "train.num_visualizations=0", "data.workers=0"]
    if c["norm"] == "syncbn":
        ov.append(f"model.bn_group_size={c['bn_group_ranks']}")
    return ov


def diverged(records: list[dict], crashed_nonfinite: bool) -> bool:
    if crashed_nonfinite:
        return True
    losses = [r["loss"] for r in records]
    return bool(losses) and (not all(map(math.isfinite, losses)) or max(losses) > 3 * losses[0])


def run_cell(c: dict, images: int, out_root: Path, limit_s: float, extra: list[str]) -> dict:
    out = out_root / c["name"]
    done = out / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "horovodrun"), "-np", str(c["ranks"]), "-H", f"localhost:{c['ranks']}", "--mpi",
           sys.executable, str(REPO / "scripts/train.py"), "--config", "shapes_tiny", "--output-dir", str(out),
           *overrides(c, images), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl_vader_single_copy_mechanism": "none", "PYTHONPATH": str(REPO)}
    for stale in ("metrics.jsonl", "eval/metrics.json"):
        (out / stale).unlink(missing_ok=True)
    print(f"-- {c['name']}: {c['ranks']} ranks x {c['images_per_rank']} images, {c['norm']}, "
          f"lr x{c['lr_scale']}, warmup {c['warmup']}", flush=True)
    t0 = time.time()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit_s)
        code, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        code, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)
    wall = time.time() - t0
    (out / "launcher.log").write_text(text or "")
    metrics_file = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    nonfinite = "NonFiniteLoss" in (text or "")
    ev = out / "eval" / "metrics.json"
    m = json.loads(ev.read_text()) if ev.is_file() and code == 0 else {}
    result = {**c, "lr": BASE_LR * c["lr_scale"] * c["mini_batch"] / REFERENCE, "images": images,
              "iterations": records[-1]["iteration"] if records else 0, "exit": code,
              "AP": m.get("AP", 0.0), "AP50": m.get("AP50", 0.0), "diverged": diverged(records, nonfinite),
              "final_loss": records[-1]["loss"] if records else None,
              "peak_loss": max((r["loss"] for r in records), default=None), "wall_s": round(wall, 1),
              "bn_size": c["bn_group_ranks"] * c["images_per_rank"] if c["norm"] == "syncbn" else 0,
              "loss_curve": [[r["images"], r["loss"]] for r in records]}
    print(f"   AP {result['AP']:.3f}  diverged {result['diverged']}  {result['iterations']} iterations  "
          f"{wall:.0f} s", flush=True)
    if code != 0 and not result["diverged"]:  # not recorded as done: a rerun tries it again
        print(f"   {c['name']} FAILED (exit {code}); see {out / 'launcher.log'}", flush=True)
    else:
        done.write_text(json.dumps(result))
    return result


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for group, label in (("cgbn", "CGBN + warmup"), ("nobn", "no BN stats + warmup")):
        pts = sorted((c["mini_batch"], c["AP"], c["diverged"]) for c in cells if c["group"] == group)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], marker="x", s=90, c="red")
    for c in cells:
        if "halflr" in c["name"] or c["group"] == "nowarmup":
            ax.scatter([c["mini_batch"]], [c["AP"]], marker="s" if "halflr" in c["name"] else "^",
                       label=c["name"], zorder=3)
    seeds = [c["AP"] for c in cells if c["group"] == "seed" or c["name"] == "cgbn_b8"]
    if len(seeds) > 1:
        ax.scatter([8] * len(seeds), seeds, c="gray", s=14, label=f"CGBN b8, {len(seeds)} seeds", zorder=2)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="mini-batch (images)", ylabel="bbox AP", title="AP vs mini-batch (red x = diverged)")
    ax.legend(fontsize=7)
    ax = axes[1]
    pts = sorted((c["bn_size"], c["AP"]) for c in cells if c["group"] == "bnsize" or
                 (c["group"] == "cgbn" and c["mini_batch"] == 32))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, max([p[1] for p in pts] + [0.01]) * 1.5)
    ax.set(xlabel="BN size (images)", ylabel="bbox AP", title="AP vs BN size (mini-batch 32)")
    ax = axes[2]
    biggest = max((c["mini_batch"] for c in cells), default=0)
    for c in cells:
        if c["mini_batch"] == biggest and c["norm"] == "syncbn" and c["loss_curve"]:
            xs, ys = zip(*c["loss_curve"])
            ax.plot(xs, ys, label=f"{c['name']} ({'warmup' if c['warmup'] else 'no warmup'})")
    ax.set_yscale("log")
    ax.set(xlabel="images seen", ylabel="training loss (log)", title=f"loss at mini-batch {biggest}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "megdet_miniature"))
    p.add_argument("--images", type=int, default=4000, help="training images per cell")
    p.add_argument("--cell-timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--quick", action="store_true", help="two tiny cells (a test of the script)")
    p.add_argument("--data-root", default=None, help="the shapes set (default: shapes_tiny's cache)")
    args = p.parse_args()
    out = Path(args.output_dir)
    images = 160 if args.quick else args.images
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    if args.quick:  # a small, separate data set
        extra = [f"data.root={args.data_root or out / 'shapes'}", "data.shapes_train=64", "data.shapes_val=16",
                 "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96"]
    t0 = time.time()
    cells = [run_cell(c, images, out, args.cell_timeout, extra) for c in grid(args.quick)]
    summary = {"images_per_cell": images, "reference_batch": REFERENCE, "base_lr": BASE_LR,
               "warmup_fraction": WARMUP_FRACTION, "cells_wall_s": round(sum(c["wall_s"] for c in cells), 1),
               "wall_s": round(time.time() - t0, 1), "cells": cells}
    dest = out if args.quick else REPO / "benchmarks"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "megdet_miniature.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(cells, dest / "megdet_miniature.png")
    print(f"\n{'cell':22} {'batch':>5} {'BN':>3} {'lr':>7} {'AP':>6} {'div':>5} {'iters':>6} {'s':>6}")
    for c in cells:
        print(f"{c['name']:22} {c['mini_batch']:5d} {c['bn_size']:3d} {c['lr']:7.4f} {c['AP']:6.3f} "
              f"{str(c['diverged']):>5} {c['iterations']:6d} {c['wall_s']:6.0f}")
    print(f"saved {dest / 'megdet_miniature.json'} and .png ({summary['wall_s']:.0f} s now; the cells took "
          f"{summary['cells_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
