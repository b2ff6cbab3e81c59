#!/usr/bin/env python
"""Training throughput of the real trainer on CPU ranks (one thread each).

    python scripts/experiments/benchmark_train.py [--iters 60] [--output benchmarks/train.json]

Runs shapes_tiny under ``horovodrun -np 1`` and ``-np 2`` (MPI controller), times
``--iters`` iterations after a warm-up, and reports images/s and the scaling efficiency
(throughput at 2 / (2 x throughput at 1)). With -np 1 it also times iterations of the full
``megdet_r50_fpn`` recipe (ResNet-50-FPN, SyncBN, 2 images) at a small image size, to show
that it builds and steps. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, horovodrun


def worker(out: str, iters: int, warmup: int, r50: bool) -> None:
    from hvd_megdet import app, config, dist
    from hvd_megdet.engine import Trainer

    tmp = Path(out).parent
    result = {}
    # the demo's model and data; a long schedule so that the timed window sits at full lr
    cfg = config.load("shapes_tiny", ["solver.max_iter=100000", "solver.steps=[90000]",
                                      "solver.scale_schedule=false", "train.checkpoint_period=100000",
                                      "train.log_period=100000"])
    app.start_horovod(cfg, training=True)
    run_dir, log = app.start(cfg, tmp / f"tiny-np{dist.size()}")
    t = Trainer(cfg, run_dir, log)
    t.train(until_images=warmup * t.sched.global_batch)
    dist.barrier()
    t0 = time.perf_counter()
    t.train(until_images=(warmup + iters) * t.sched.global_batch)
    dist.barrier()
    sec = time.perf_counter() - t0
    result["tiny"] = {"ranks": dist.size(), "iters": iters, "seconds": sec,
                      "images_per_s": iters * cfg.solver.images_per_rank * dist.size() / sec}
    if r50 and dist.size() == 1:
        cfg = config.load("megdet_r50_fpn", [
            "data.dataset=shapes", "data.root=''", "data.train_images=train", "data.val_images=val",
            "data.train_annotations=annotations/instances_train.json",
            "data.val_annotations=annotations/instances_val.json", "data.min_size=256", "data.max_size=256",
            "data.workers=0", "model.bn_group_size=0", "train.checkpoint_period=100000", "train.log_period=1"])
        app.start_horovod(cfg, training=True)
        run_dir, log = app.start(cfg, tmp / "r50")
        t = Trainer(cfg, run_dir, log)
        times = []
        for k in range(1, 4):
            t0 = time.perf_counter()
            t.train(until_images=k * t.sched.global_batch)
            times.append(time.perf_counter() - t0)
        result["megdet_r50_fpn"] = {"image_size": 256, "images_per_rank": 2, "norm": "SyncBatchNorm",
                                    "seconds_per_iter": times, "params_M": sum(p.numel() for p in t.model.parameters()) / 1e6}
    if dist.is_main():
        Path(out).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "train.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--r50", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.iters, args.warmup, args.r50)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in (1, 2):
            out = Path(tmp) / f"np{np_}.json"
            horovodrun(np_, [__file__, "--worker", out, "--iters", args.iters, "--warmup", args.warmup]
                       + (["--r50"] if np_ == 1 else []), timeout=1800)
            results[np_] = json.loads(out.read_text())
    one, two = results[1]["tiny"]["images_per_s"], results[2]["tiny"]["images_per_s"]
    report = {"shapes_tiny": {"np1_images_per_s": one, "np2_images_per_s": two,
                              "scaling_efficiency": two / (2 * one), "iters": args.iters,
                              "threads_per_rank": 1, "controller": "mpi"},
              "megdet_r50_fpn": results[1]["megdet_r50_fpn"]}
    print(f"shapes_tiny: np=1 {one:.1f} img/s, np=2 {two:.1f} img/s, scaling efficiency {two / (2 * one):.2f}")
    r = report["megdet_r50_fpn"]
    print(f"megdet_r50_fpn ({r['params_M']:.1f}M params, SyncBN, 2 x {r['image_size']} px): "
          f"{', '.join(f'{s:.2f}' for s in r['seconds_per_iter'])} s per iteration (1 CPU thread)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
