#!/usr/bin/env python
"""MegDet's findings in miniature, in the paper's regime: a grid of real training jobs on the embedded shapes data.

    python scripts/experiments/reproduce_megdet.py [--output-dir outputs/megdet_miniature] [--cells NAME ...] [--seeds N]
    python scripts/experiments/reproduce_megdet.py --pilot   # the baseline alone, evaluated every 320 images
    python scripts/experiments/reproduce_megdet.py --list    # the cells and their estimated wall time, nothing run
    python scripts/experiments/reproduce_megdet.py --quick   # two tiny cells (a test of the script)

The regime (MegDet fine-tunes an ImageNet-pretrained ResNet-50 for ~12-16 COCO epochs):

* every cell starts from the same PRETRAINED backbone (scripts/pretrain_backbone.py: the tiny
  ResNet body classified shapes that are not detection classes; generated under horovodrun on first
  use); frozen-BN cells (model.norm=frozen) normalise with its BN statistics, MegDet's "without BN";
* every cell sees the same 9600 images (12 epochs of the 800 training images, COCO's 1x is 12
  epochs), so the largest mini-batch (32) still makes 300 updates; linear scaling rule (lr 0.01 per
  8 images: MegDet's 0.02 per 16, the same lr per image), linear warmup over the first 10 % of the
  images from x0.001, lr x0.1 at 2/3 and 8/9 of them (Detectron's 1x: 60k and 80k of 90k); all
  fixed fractions, nothing tuned per cell; AP on the same 100 val images every 1600 images
  (train.eval_period): an AP-vs-images curve per cell.

The axes (mini-batch = ranks x images per rank; ranks oversubscribe this machine's cores):

  cgbn      (a) CGBN over all ranks + warmup, mini-batch 4 (1x4), 8 (2x4: the baseline), 16 (4x4), 32 (8x4)
  frozen    (b) frozen pretrained BN + warmup, same batches; plus half the lr at 16 and 32
  nowarmup  (c) mini-batch 32 with CGBN and no warmup
  bnsize    (d) BN size at mini-batch 32: 2 (16x2, local BN), 4 (8x4, local BN), 8, 16 (8x4, BN groups
            of 2 and 4 ranks), 32 (= cgbn_b32)
  seeds     (e) seeds 42, 1, 2 of the baseline cgbn_b8; --seeds N (default 8: 42, 1, ..., 7) of every
            cell where MegDet saw failures, at mini-batch 32: BN size 2, 4, 8, frozen BN, CGBN without
            warmup and CGBN with warmup (cgbn_b32, the control). The backbone stays the same; seeds
            run seed-major (every rate cell's seed 3 before any seed 4), so a partial grid is balanced.
            Each of these cells gets a divergence rate with a 95 % Wilson interval, the iteration and
            lr where each divergent run blew up, and AP mean / spread over its converged runs.

A BN statistic over k images is the same function whatever the split of those k images over ranks
(SyncBN equals BatchNorm on the concatenated batch, tests/test_sync_bn.py): only BN size 2 needs 2
images per rank; the others keep 4 per rank, which costs 2-4x less per image here.

Cost (--list; model below, from the throughputs in README "Benchmarks" and the committed grid's; it overestimates
the 16-rank cells): --seeds 1 is 17 cells, about 1.7 h on this 2-core machine, plus the backbone's pretraining
(~2 min) on first use; each seed more adds 6 cells (~0.6 h), 6.2 h for the default 8; the pilot ~7 min.

A cell diverged if it stopped on a non-finite loss or its loss rose above 3x its first logged value.
Finished cells are skipped (resumable) unless their recipe changed or --rerun; --cells runs only the
named ones (a name without _seedS means all its seeds); each cell has a time limit. Writes OUTPUT_DIR/<cell>/cell.json and
benchmarks/megdet_miniature.{json,png} (--pilot: benchmarks/megdet_pilot.*; --quick: in OUTPUT_DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import REPO, read_jsonl

from hvd_megdet import config, localjob, plan, pretrain

REFERENCE = 8            # the batch that the base lr is given for (the demo's 2 ranks x 4 images)
BASELINE = "cgbn_b8"
SEEDS = (42, 1, 2)          # the baseline's seeds; the first N of 42, 1, 2, 3, ... for the rate cells
RATE_SEEDS = 8
# where MegDet saw failures ("sometimes", "worse"), all at mini-batch 32 (lr 0.04); cgbn_b32 is the control
RATE_CELLS = ("bnsize_b32_bn2", "bnsize_b32_bn4", "bnsize_b32_bn8", "frozen_b32", "cgbn_b32_nowarmup", "cgbn_b32")
PRETRAIN_RANKS = 2
DEFAULTS = {  # the recipe; --quick and --pilot change only what they say
    "images": 9600,           # per cell: 12 epochs of 800; 300 updates at mini-batch 32
    "base_lr": 0.01,          # per REFERENCE images (MegDet: 0.02 per 16)
    "warmup_fraction": 0.1,
    "decay_fractions": (2 / 3, 8 / 9),
    "eval_period": 1600,      # images between evaluations (6 points per curve)
    "train_images": 800,      # data.shapes_train
}
PILOT_EVAL_PERIOD = 320
QUICK = {"images": 160, "eval_period": 80, "train_images": 64}

# --- cost model: images/s of training, one thread per rank, this 2-core machine -----------------
# >= 4 images per rank, by ranks: np1 benchmarks/train.json (19.7); np2 the demo (README "Benchmarks", ~34);
# np4 / np8 the committed 4000-image grid (cgbn_b16 120 s, cgbn_b32 133 s with start-up and
# evaluation: 33 / 30 gross); np16 extrapolated.
RATE_4 = {1: 19.7, 2: 34.0, 4: 33.0, 8: 30.0, 16: 28.0}
# 1 image per rank (README "Benchmarks": 6.6 / 9.1 / 8.3 / 11.5, 20 iterations with warm-up): 3-5x the cost.
RATE_1 = {2: 6.6, 4: 9.1, 8: 8.3, 16: 11.5}
FROZEN_SPEEDUP = 53 / 49  # README "Benchmarks": frozen BN 53 vs SyncBN 49 images/s
START_S, EVAL_S = 20.0, 3.0  # launch + set-up of a cell; one evaluation of 100 val images


def rate(ranks: int, per_rank: int, norm: str) -> float:
    """Estimated training images/s. Between 1 and 4 images per rank the cost per image is
    a + b / images (a >= 0) through the two measured ends."""
    r4 = RATE_4.get(ranks, RATE_4[16])
    if per_rank >= 4 or ranks not in RATE_1:
        r = r4 * min(per_rank, 4) / 4
    else:
        c1, c4 = 1 / RATE_1[ranks], 1 / r4
        b = (c1 - c4) / 0.75
        a = max(c1 - b, 0.0)
        r = 1 / (a + b / per_rank)
    return r * (FROZEN_SPEEDUP if norm == "frozen" else 1.0)


def estimate_s(c: dict, recipe: dict) -> float:
    evals = recipe["images"] // recipe["eval_period"] + (recipe["images"] % recipe["eval_period"] > 0)
    return START_S + recipe["images"] / rate(c["ranks"], c["images_per_rank"], c["norm"]) + EVAL_S * evals


# --- the grid ----------------------------------------------------------------------------------

def cell(name, group, ranks, per_rank, norm="syncbn", bn_ranks=0, lr_scale=1.0, warmup=True, seed=42):
    bn_ranks = (bn_ranks or ranks) if norm == "syncbn" else 0
    return {"name": name if seed == 42 else f"{name}_seed{seed}", "group": group, "ranks": ranks,
            "images_per_rank": per_rank, "mini_batch": ranks * per_rank, "norm": norm, "bn_group_ranks": bn_ranks,
            "bn_size": bn_ranks * per_rank, "lr_scale": lr_scale, "warmup": warmup, "seed": seed}


def seed_list(n: int) -> tuple[int, ...]:
    """The first ``n`` seeds: 42 (every single-seed cell's), then 1, 2, 3, ..."""
    return (42, *range(1, n))


def grid(quick: bool = False, seeds: int = RATE_SEEDS) -> list[dict]:
    if quick:  # two tiny cells: one that trains, one that must diverge
        return [cell("quick_cgbn_b4", "cgbn", 2, 2),
                cell("quick_frozen_lr1000", "frozen", 2, 2, norm="frozen", lr_scale=1000.0, warmup=False)]
    axis = ((1, 4), (2, 4), (4, 4), (8, 4))
    cells = [cell(f"cgbn_b{r * p}", "cgbn", r, p) for r, p in axis]
    cells += [cell(f"frozen_b{r * p}", "frozen", r, p, norm="frozen") for r, p in axis]
    cells += [cell(f"frozen_b{r * p}_halflr", "frozen", r, p, norm="frozen", lr_scale=0.5) for r, p in axis[2:]]
    cells += [cell("cgbn_b32_nowarmup", "nowarmup", 8, 4, warmup=False)]
    bnsize = lambda bn, seed=42: (cell("bnsize_b32_bn2", "bnsize", 16, 2, bn_ranks=1, seed=seed) if bn == 2 else
                                  cell(f"bnsize_b32_bn{bn}", "bnsize", 8, 4, bn_ranks=bn // 4, seed=seed))
    cells += [bnsize(bn) for bn in (2, 4, 8, 16)]  # BN size 32 is cgbn_b32
    first = {c["name"]: c for c in cells}
    for seed in seed_list(max(seeds, len(SEEDS)))[1:]:  # seed-major: a partial grid stays balanced
        names = ((BASELINE,) if seed in SEEDS else ()) + (RATE_CELLS if seed in seed_list(seeds) else ())
        cells += [{**first[n], "name": f"{n}_seed{seed}", "seed": seed} for n in names]
    return cells


def base_name(name: str) -> str:
    return name.split("_seed")[0]


def schedule(c: dict, recipe: dict) -> tuple[int, list[int], int]:
    """(max_iter, steps, warmup_iters) in configured iterations, i.e. at the reference batch
    (images / 8): the same images for every cell, whatever its mini-batch."""
    iters = recipe["images"] // REFERENCE
    steps = sorted({min(max(1, round(iters * f)), iters - 1) for f in recipe["decay_fractions"]})
    warmup = max(1, round(iters * recipe["warmup_fraction"])) if c["warmup"] and recipe["warmup_fraction"] else 0
    return iters, steps, warmup


def overrides(c: dict, recipe: dict, backbone: str) -> list[str]:
    iters, steps, warmup = schedule(c, recipe)
    ov = [f"solver.images_per_rank={c['images_per_rank']}", f"solver.reference_batch={REFERENCE}",
          f"solver.base_lr={recipe['base_lr'] * c['lr_scale']:g}", f"solver.max_iter={iters}",
          f"solver.steps=[{','.join(map(str, steps))}]", f"solver.warmup_iters={warmup}",
          f"model.norm={c['norm']}", f"model.backbone_weights={backbone}", f"train.seed={c['seed']}",
          f"train.eval_period={recipe['eval_period'] // REFERENCE}", f"data.shapes_train={recipe['train_images']}",
          "train.checkpoint_period=1000000", "train.checkpoint_minutes=0", "train.num_visualizations=0",
          f"train.log_period={max(1, 40 // c['mini_batch'])}", "data.workers=0"]
    if c["norm"] == "syncbn":
        ov.append(f"model.bn_group_size={c['bn_group_ranks']}")
    return ov


def blew_up(loss: float, first: float) -> bool:
    return not math.isfinite(loss) or loss > 3 * first


def diverged(records: list[dict], crashed_nonfinite: bool) -> bool:
    if crashed_nonfinite:
        return True
    losses = [r["loss"] for r in records]
    return bool(losses) and any(blew_up(v, losses[0]) for v in losses)


def blowup(records: list[dict], text: str, sched) -> dict | None:
    """Where a divergent run blew up: the first logged iteration whose loss is non-finite or above
    3x the first, else the iteration the non-finite check stopped at (lr from the schedule)."""
    first = records[0]["loss"] if records else None
    for r in records:
        if blew_up(r["loss"], first):
            return {"iteration": r["iteration"], "images": r["images"], "lr": r["lr"], "loss": r["loss"]}
    m = re.search(r"non-finite loss at iteration (\d+)", text or "")
    if m:
        it = int(m.group(1))
        images = it * sched.global_batch
        return {"iteration": it, "images": images, "lr": sched.lr_at(images), "loss": None}
    return None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k / n (honest at k = 0 or n, unlike k/n +- 2 sd)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def ap_curve(out: Path) -> list[list[float]]:
    """[images seen, AP, AP50] of every evaluation, from the run's eval/history.jsonl."""
    return [[e["images_seen"], round(e["AP"], 5), round(e["AP50"], 5)] for e in read_jsonl(out / "eval" / "history.jsonl")]


def cell_plan(c: dict, ov: list[str]) -> plan.Plan:
    """What the engine trains for this cell's command line (schedule in images, lr after scaling)."""
    return plan.resolve(config.load("shapes_tiny", ov), c["ranks"])


def run_job(cmd: list[str], env: dict, limit_s: float) -> tuple[int | str, str]:
    """(exit code or 'timeout', output); a job past its limit is killed with all its ranks."""
    try:
        res = localjob.run(cmd, limit_s, env)
        return res.returncode, res.stdout
    except localjob.JobTimeout as e:
        return "timeout", e.output


def cell_key(c: dict, ov: list[str]) -> str:
    """What makes a finished cell reusable: its cell and its full command line (threads aside)."""
    blob = json.dumps([{k: c[k] for k in sorted(c)}, [o for o in ov if not o.startswith("train.threads_per_rank")]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished(out_root: Path, c: dict, recipe: dict, backbone: dict, extra: list[str]) -> dict | None:
    """The cell's result if it ran with this recipe and backbone: its cell.json in the output dir,
    else the committed benchmarks/megdet_miniature.json (a grid continued in a fresh checkout)."""
    key = cell_key(c, overrides(c, recipe, backbone["path"]) + extra)
    done = out_root / c["name"] / "cell.json"
    if not done.is_file():
        committed = REPO / "benchmarks" / "megdet_miniature.json"
        cells = json.loads(committed.read_text()).get("cells", []) if committed.is_file() else []
        return next((r for r in cells if r.get("name") == c["name"] and r.get("key") == key), None)
    result = json.loads(done.read_text())
    if result.get("key") != key:
        print(f"-- {c['name']}: finished with another recipe or backbone: re-running it", flush=True)
        return None
    return result


def run_cell(c: dict, recipe: dict, backbone: dict, out_root: Path, limit_s: float | None,
             extra: list[str]) -> dict:
    out = out_root / c["name"]
    shutil.rmtree(out, ignore_errors=True)  # no stale metrics, TensorBoard events or checkpoints
    out.mkdir(parents=True)
    threads = max(1, (os.cpu_count() or 1) // c["ranks"])  # np 1 may use every core
    ov = overrides(c, recipe, backbone["path"]) + extra + [f"train.threads_per_rank={threads}"]
    cmd = localjob.horovodrun(c["ranks"], "mpi", [sys.executable, str(REPO / "scripts/train.py"), "--config",
                                                  "shapes_tiny", "--output-dir", str(out), *ov])
    est = estimate_s(c, recipe)
    limit = limit_s or max(300.0, 3 * est)
    print(f"-- {c['name']}: {c['ranks']} ranks x {c['images_per_rank']} images, {c['norm']}, BN size "
          f"{c['bn_size'] or '-'}, lr x{c['lr_scale']}, warmup {c['warmup']}, seed {c['seed']} "
          f"(estimate {est:.0f} s, limit {limit:.0f} s)", flush=True)
    t0 = time.time()
    code, text = run_job(cmd, localjob.job_env(threads), limit)
    wall = time.time() - t0
    (out / "launcher.log").write_text(text or "")
    metrics_file = out / "metrics.jsonl"
    records = read_jsonl(metrics_file)
    ev = out / "eval" / "metrics.json"
    m = json.loads(ev.read_text()) if ev.is_file() and code == 0 else {}
    sched = cell_plan(c, ov).schedule
    result = {**c, "config": "shapes_tiny", "overrides": ov, "key": cell_key(c, ov),
              "lr": sched.lr, "images": sched.total_images,
              "warmup_images": sched.warmup_images, "decay_images": list(sched.step_images),
              "eval_period_images": recipe["eval_period"], "iterations": records[-1]["iteration"] if records else 0,
              "exit": code, "AP": m.get("AP", 0.0), "AP50": m.get("AP50", 0.0),
              "diverged": diverged(records, "NonFiniteLoss" in (text or "")),
              "blowup": blowup(records, text, sched),
              "final_loss": records[-1]["loss"] if records else None,
              "peak_loss": max((r["loss"] for r in records), default=None), "wall_s": round(wall, 1),
              "estimate_s": round(est), "threads_per_rank": threads,
              "backbone_weights": backbone["path"], "backbone_digest": backbone["digest"],
              "backbone_heldout_accuracy": backbone["heldout_accuracy"],
              "ap_curve": ap_curve(out), "loss_curve": [[r["images"], r["loss"]] for r in records]}
    print(f"   AP {result['AP']:.3f}  diverged {result['diverged']}  {result['iterations']} iterations  "
          f"{wall:.0f} s", flush=True)
    if code != 0 and not result["diverged"]:  # not recorded as done: a rerun tries it again
        print(f"   {c['name']} FAILED (exit {code}); see {out / 'launcher.log'}", flush=True)
    else:
        (out / "cell.json").write_text(json.dumps(result))
    return result


def ensure_backbone(quick: bool) -> dict:
    """The pretrained backbone's weights.json (path, digest, held-out accuracy), pretraining it
    under horovodrun first if the cache does not hold it yet."""
    recipe = pretrain.QUICK if quick else pretrain.DEFAULT
    folder = pretrain.weights_dir(recipe, PRETRAIN_RANKS)
    info = pretrain.read_info(folder)
    if info is None:
        print(f"-- pretraining the backbone on {PRETRAIN_RANKS} ranks into {folder}", flush=True)
        cmd = localjob.horovodrun(PRETRAIN_RANKS, "mpi", [sys.executable, str(REPO / "scripts/pretrain_backbone.py")]
                                  + (["--quick"] if quick else []))
        code, text = run_job(cmd, localjob.job_env(1), 600 if quick else 3600)
        info = pretrain.read_info(folder)
        if code != 0 or info is None:
            print(text, f"\npretraining failed (exit {code})", file=sys.stderr, flush=True)
            raise SystemExit(1)
    else:
        print(f"-- backbone: reusing {folder}", flush=True)
    print(f"   held-out accuracy {info['heldout_accuracy']:.3f} (chance {info['chance']:.3f}), "
          f"pretrained in {info['wall_s']:.0f} s", flush=True)
    return info


# --- the summary: JSON, PNG, table -----------------------------------------------------------

def points(cells: list[dict], group: str, x: str, **match) -> list[tuple]:
    """(x, AP of the first seed, min, max over the seeds, seeds, any diverged) per value of ``x``
    among the matching cells. The line follows the first seed in every cell: cells of one seed share
    the data order and the head's initialisation, so their differences are paired; the bar spans
    the seeds where more than one ran."""
    by = {}
    for c in cells:
        if c["group"] == group and all(c[k] == v for k, v in match.items()):
            by.setdefault(c[x], []).append(c)
    return [(k, next((c["AP"] for c in v if c["seed"] == SEEDS[0]), v[0]["AP"]), min(c["AP"] for c in v),
             max(c["AP"] for c in v), len(v), any(c["diverged"] for c in v)) for k, v in sorted(by.items())]


def aggregates(cells: list[dict]) -> list[dict]:
    """Every cell run with more than one seed: its divergence rate with a 95 % Wilson interval, where
    each divergent run blew up, and AP of each seed with mean and spread (max - min) over the
    converged runs (a diverged run has no AP)."""
    by = {}
    for c in cells:
        by.setdefault(base_name(c["name"]), []).append(c)
    out = []
    for k, v in by.items():
        if len(v) < 2:
            continue
        ok = [c for c in v if not c["diverged"]]
        aps = [c["AP"] for c in ok]
        k_div = len(v) - len(ok)
        out.append({"cell": k, "seeds": [c["seed"] for c in v], "runs": len(v), "diverged": k_div,
                    "divergence_rate": k_div / len(v), "divergence_ci95": list(wilson(k_div, len(v))),
                    "blowups": [{"seed": c["seed"], **(c.get("blowup") or {})} for c in v if c["diverged"]],
                    "AP": [c["AP"] for c in v], "AP_converged": aps,
                    "AP_mean": sum(aps) / len(aps) if aps else None,
                    "AP_spread": max(aps) - min(aps) if aps else None,
                    "AP_sd": statistics.stdev(aps) if len(aps) > 1 else None})
    return out


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(19, 9))

    def spread(ax, pts, label, style, color):
        if not pts:
            return
        xs, first, lo, hi = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], [p[3] for p in pts]
        ax.errorbar(xs, first, yerr=[[m - a for m, a in zip(first, lo)], [b - m for m, b in zip(first, hi)]],
                    fmt=style, capsize=4, label=label, color=color)
        ax.scatter([p[0] for p in pts if p[5]], [p[1] for p in pts if p[5]], marker="x", s=110, c="red", zorder=4)

    ax = axes[0, 0]
    seeds = f"line: seed {SEEDS[0]}; bar: seeds min-max"
    spread(ax, points(cells, "cgbn", "mini_batch", lr_scale=1.0), f"CGBN + warmup ({seeds})", "o-", "tab:blue")
    spread(ax, points(cells, "frozen", "mini_batch", lr_scale=1.0), "frozen BN + warmup", "s-", "tab:orange")
    spread(ax, points(cells, "frozen", "mini_batch", lr_scale=0.5), "frozen BN, half lr", "D--", "tab:green")
    spread(ax, points(cells, "nowarmup", "mini_batch"), "CGBN, no warmup", "^", "tab:purple")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="mini-batch (images)", ylabel="bbox AP", title="AP vs mini-batch (red x = diverged)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    biggest = max((c["mini_batch"] for c in cells if c["group"] == "cgbn"), default=0)
    pool = [{**c, "group": "bnsize"} for c in cells
            if c["group"] == "bnsize" or (c["group"] == "cgbn" and c["mini_batch"] == biggest and c["lr_scale"] == 1.0)]
    spread(ax, points(pool, "bnsize", "bn_size", mini_batch=biggest), f"CGBN, mini-batch {biggest} ({seeds})", "o-",
           "tab:blue")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="BN size (images per statistic)", ylabel="bbox AP", title=f"AP vs BN size (mini-batch {biggest})")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for c in cells:
        if c["mini_batch"] == biggest and c["norm"] == "syncbn" and c["seed"] == 42 and c["loss_curve"] \
                and c["group"] in ("cgbn", "nowarmup"):
            xs, ys = zip(*c["loss_curve"])
            ax.plot(xs, ys, label=f"{c['name']} ({'warmup' if c['warmup'] else 'no warmup'})")
    ax.set_yscale("log")
    ax.set(xlabel="images seen", ylabel="training loss (log)", title=f"loss at mini-batch {biggest}, CGBN")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    smallest = min((c["mini_batch"] for c in cells if c["name"].startswith(BASELINE)), default=None)
    for c in cells:
        if c["group"] == "cgbn" and c["ap_curve"] and (c["name"].startswith(BASELINE) or c["mini_batch"] == biggest):
            xs, ys = [p[0] for p in c["ap_curve"]], [p[1] for p in c["ap_curve"]]
            ax.plot(xs, ys, "o-" if c["mini_batch"] == smallest else "s--", ms=3,
                    label=f"mini-batch {c['mini_batch']}, seed {c['seed']}")
    ax.set(xlabel="images seen", ylabel="bbox AP (val)", title="AP vs images seen: baseline and largest batch")
    ax.legend(fontsize=7)
    rates = [a for a in aggregates(cells) if a["cell"] in RATE_CELLS or a["cell"] == BASELINE]
    names = [f"{a['cell']}\n({a['runs']} seeds)" for a in rates]
    ax = axes[0, 2]
    for i, a in enumerate(rates):
        lo, hi = a["divergence_ci95"]
        ax.errorbar([i], [a["divergence_rate"]], yerr=[[a["divergence_rate"] - lo], [hi - a["divergence_rate"]]],
                    fmt="o", capsize=5, color="tab:red" if a["diverged"] else "tab:blue")
    ax.set_xticks(range(len(rates)), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylim=(-0.02, 1.02), ylabel="divergence rate (95 % Wilson interval)",
           title="divergence rate per cell (same recipe, seeds 42, 1, 2, ...)")
    ax = axes[1, 2]
    for i, a in enumerate(rates):
        ax.scatter([i] * len(a["AP_converged"]), a["AP_converged"], s=14, color="tab:blue")
        if a["AP_mean"] is not None:
            ax.hlines(a["AP_mean"], i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(rates)), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="bbox AP", title="AP of the converged seeds (bar: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(cells: list[dict]) -> str:
    head = ("cell", "batch", "BN", "lr", "AP", "AP50", "div", "iters", "s", "est")
    lines = [f"{head[0]:26} " + " ".join(f"{h:>{w}}" for h, w in zip(head[1:], (5, 3, 7, 6, 6, 5, 6, 6, 6)))]
    for c in cells:
        lines.append(f"{c['name']:26} {c['mini_batch']:5d} {c['bn_size']:3d} {c['lr']:7.4f} {c['AP']:6.3f} "
                     f"{c['AP50']:6.3f} {str(c['diverged']):>5} {c['iterations']:6d} {c['wall_s']:6.0f} "
                     f"{c['estimate_s']:6.0f}")
    return "\n".join(lines)


def rate_table(rates: list[dict]) -> str:
    lines = [f"{'cell':22} {'runs':>4} {'div':>3} {'rate':>5} {'95% interval':>13}  {'AP mean':>7} {'spread':>6}  blew up"]
    for a in rates:
        lo, hi = a["divergence_ci95"]
        ap = f"{a['AP_mean']:7.3f} {a['AP_spread']:6.3f}" if a["AP_mean"] is not None else f"{'-':>7} {'-':>6}"
        ups = ", ".join(f"seed {b['seed']}: it {b.get('iteration', '?')} lr {b.get('lr', float('nan')):.4f}"
                        for b in a["blowups"])
        lines.append(f"{a['cell']:22} {a['runs']:4d} {a['diverged']:3d} {a['divergence_rate']:5.2f} "
                     f"[{lo:4.2f}, {hi:4.2f}]  {ap}  {ups}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "megdet_miniature"))
    p.add_argument("--cells", nargs="+", metavar="NAME",
                   help="only these cells (see --list); a name without _seedS selects all its seeds")
    p.add_argument("--rerun", action="store_true", help="run the selected cells again even if finished")
    p.add_argument("--seeds", type=int, default=RATE_SEEDS,
                   help=f"seeds of each rate cell ({', '.join(RATE_CELLS)}): 42, 1, ..., N-1 (default {RATE_SEEDS})")
    p.add_argument("--images", type=int, default=DEFAULTS["images"], help="training images per cell")
    p.add_argument("--base-lr", type=float, default=DEFAULTS["base_lr"], help=f"lr per {REFERENCE} images")
    p.add_argument("--warmup-fraction", type=float, default=DEFAULTS["warmup_fraction"],
                   help="linear warmup over this fraction of the images")
    p.add_argument("--decay-fractions", type=float, nargs="+", default=list(DEFAULTS["decay_fractions"]),
                   help="lr x0.1 after these fractions of the images")
    p.add_argument("--eval-period", type=int, default=None,
                   help=f"images between evaluations (default {DEFAULTS['eval_period']}; --pilot {PILOT_EVAL_PERIOD})")
    p.add_argument("--train-images", type=int, default=DEFAULTS["train_images"],
                   help="size of the generated training set (data.shapes_train)")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="seconds per cell (default: 3x its estimate, at least 300)")
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: write the JSON/PNG of the cells finished so far (a grid in progress)")
    p.add_argument("--pilot", action="store_true", help=f"only the baseline ({BASELINE}), evaluated often")
    p.add_argument("--list", action="store_true", help="print the cells and the cost model's estimates, run nothing")
    p.add_argument("--quick", action="store_true", help="two tiny cells and a tiny pretraining (a test of the script)")
    p.add_argument("--data-root", default=None, help="the shapes set (default: shapes_tiny's cache)")
    p.add_argument("--save-as", default=None, metavar="NAME",
                   help="write benchmarks/NAME.{json,png} and OUTPUT_DIR/NAME/ (needed for a recipe other than the "
                        "grid's, so that a diagnostic run never overwrites the committed grid)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.quick:
        args.images, args.train_images = QUICK["images"], QUICK["train_images"]
        args.eval_period = args.eval_period or QUICK["eval_period"]
    args.eval_period = args.eval_period or (PILOT_EVAL_PERIOD if args.pilot else DEFAULTS["eval_period"])
    for name in ("images", "eval_period"):
        if getattr(args, name) <= 0 or getattr(args, name) % REFERENCE:
            p.error(f"--{name.replace('_', '-')} must be a positive multiple of {REFERENCE}")
    if not all(0 < f < 1 for f in args.decay_fractions) or not 0 <= args.warmup_fraction < 1:
        p.error("--decay-fractions must lie in (0, 1) and --warmup-fraction in [0, 1)")
    if args.save_as is not None and not args.save_as.replace("_", "").replace("-", "").isalnum():
        p.error(f"--save-as {args.save_as!r}: a plain name (letters, digits, _ and -), written as benchmarks/NAME.*")
    changed = [k for k in ("images", "base_lr", "warmup_fraction", "train_images")
               if getattr(args, k) != DEFAULTS[k]] + \
        (["decay_fractions"] if tuple(sorted(args.decay_fractions)) != DEFAULTS["decay_fractions"] else [])
    if changed and not (args.quick or args.pilot or args.save_as):
        p.error(f"a recipe other than the grid's ({', '.join('--' + k.replace('_', '-') for k in changed)}) "
                f"needs --save-as NAME: it would overwrite benchmarks/megdet_miniature.*")
    return args


def main() -> int:
    args = parse_args()
    recipe = {"images": args.images, "base_lr": args.base_lr, "reference_batch": REFERENCE,
              "warmup_fraction": args.warmup_fraction, "decay_fractions": sorted(args.decay_fractions),
              "eval_period": args.eval_period, "train_images": args.train_images}
    cells = grid(args.quick, args.seeds)
    if args.pilot:
        cells = [c for c in cells if c["name"] == BASELINE]
    if args.cells:
        known = {c["name"] for c in cells} | {base_name(c["name"]) for c in cells}
        unknown = sorted(set(args.cells) - known)
        if unknown:
            print(f"unknown cell(s) {unknown}: choose from {sorted(known)}", file=sys.stderr)
            return 2
        cells = [c for c in cells if c["name"] in args.cells or base_name(c["name"]) in args.cells]
    if args.list:
        for c in cells:
            print(f"{c['name']:26} {c['ranks']:2d} ranks x {c['images_per_rank']} images  {c['norm']:6}  BN size "
                  f"{c['bn_size']:2d}  lr x{c['lr_scale']:<4} warmup {str(c['warmup']):5}  "
                  f"{cell_plan(c, overrides(c, recipe, 'weights.pth')).schedule.max_iter:5d} iterations  "
                  f"~{estimate_s(c, recipe):4.0f} s")
        total = sum(estimate_s(c, recipe) for c in cells)
        print(f"{len(cells)} cells, {args.images} images each: ~{total:.0f} s = {total / 3600:.2f} h "
              f"(+ the backbone's pretraining on first use)")
        return 0
    out = Path(args.output_dir) / (args.save_as or ("pilot" if args.pilot else ""))
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    if args.quick:  # a small, separate data set
        extra = [f"data.root={args.data_root or out / 'shapes'}", "data.shapes_val=16",
                 "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96"]
    t0 = time.time()
    backbone = ensure_backbone(args.quick)
    results = []
    for c in cells:
        done = None if args.rerun else finished(out, c, recipe, backbone, extra)
        if done is None and not args.summarize:
            done = run_cell(c, recipe, backbone, out, args.cell_timeout, extra)
        elif done is not None:
            print(f"-- {c['name']}: finished (AP {done['AP']:.3f}), skipped", flush=True)
        if done is not None:
            results.append(done)
    summary = {"recipe": recipe, "baseline": BASELINE, "seeds": list(SEEDS),
               "rate_cells": list(RATE_CELLS), "rate_seeds": list(seed_list(args.seeds)),
               "backbone": backbone, "cost_model": {"rate_4_per_rank": RATE_4, "rate_1_per_rank": RATE_1,
                                                    "frozen_speedup": FROZEN_SPEEDUP, "start_s": START_S,
                                                    "eval_s": EVAL_S},
               "estimated_wall_s": round(sum(estimate_s(c, recipe) for c in cells)),
               "cells_wall_s": round(sum(c["wall_s"] for c in results), 1),
               "this_invocation_wall_s": round(time.time() - t0, 1),
               "rates": aggregates(results), "cells": results}
    dest = out if args.quick else REPO / "benchmarks"
    name = args.save_as or ("megdet_pilot" if args.pilot else "megdet_miniature")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, dest / f"{name}.png")
    print("\n" + table(results) + "\n\n" + rate_table(summary["rates"]))
    for c in results:
        if c["ap_curve"] and (args.pilot or c["name"] == BASELINE):
            print(f"AP curve of {c['name']}: " + ", ".join(f"{int(i)}: {a:.3f}" for i, a, _ in c["ap_curve"]))
    print(f"saved {dest / name}.json and .png ({summary['this_invocation_wall_s']:.0f} s now; the cells took "
          f"{summary['cells_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
