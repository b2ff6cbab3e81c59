#!/usr/bin/env python
"""Static vs dynamic Horovod process sets, on SyncBN and on the trainer (MPI controller).

    python scripts/experiments/benchmark_process_sets.py [--output benchmarks/process_sets.json] [--reps 2]

For np = 2 and 4 (BN groups of 2 ranks: the whole world at 2, two groups at 4), alternating the
two modes ``--reps`` times: (0) the collectives alone (53 + 53 SyncBN-sized allreduces on the BN
group and one 2M-float gradient allreduce), under MPI and Gloo; (a) one forward+backward over SyncBatchNorm layers of ResNet-50's 53 BN
shapes (64 px, 2 images per rank; ms, max over ranks of the median), (b) ``train.py`` on
shapes_tiny (2 images per rank, images/s over the run). ``HVD_MEGDET_PROCESS_SETS=dynamic`` selects
the dynamic sets (``hvd.init(process_sets="dynamic")``), ``static`` the static ones (restart).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, horovodrun as run_job, layer_shapes, timed


def syncbn_worker(iters: int, out: str) -> None:
    import torch

    from hvd_megdet import dist, launch
    from hvd_megdet.sync_bn import SyncBatchNorm

    torch.set_num_threads(1)
    launch.init(bn_group_size=2)
    shapes = layer_shapes("resnet50")
    xs = [torch.randn(s, requires_grad=True) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    layers = [SyncBatchNorm(s[1], group_size=2) for s in shapes]
    def one_pass():
        for layer, x, g in zip(layers, xs, gs):
            layer(x).backward(g)
    samples = timed(one_pass, iters, warmup=3, before=dist.barrier)
    worst = max(dist.allgather_object(statistics.median(samples)))
    if dist.rank() == 0:
        Path(out).write_text(json.dumps({"ms": worst * 1e3}))


def floor_worker(iters: int, out: str) -> None:
    """The collectives alone: 53 fwd (2C+1 fp64) and 53 bwd (2C fp32) allreduces on the BN group, one
    2M-float gradient allreduce on all ranks; ms per such iteration on rank 0."""
    import torch

    from hvd_megdet import dist, launch

    torch.set_num_threads(1)
    launch.init(bn_group_size=2)
    group = dist.bn_group(2)  # np 2: the global set, np 4: a registered block
    chans = ([64, 256, 128, 512, 256, 1024, 512, 2048] * 7)[:53]
    grads = torch.randn(2_000_000)

    def iteration():
        for i, c in enumerate(chans):
            dist.allreduce(torch.randn(2 * c + 1, dtype=torch.float64), op=dist.Sum, name=f"f{i}", process_set=group)
        for i, c in enumerate(reversed(chans)):
            dist.allreduce(torch.randn(2 * c), op=dist.Sum, name=f"b{i}", process_set=group)
        dist.allreduce(grads, op=dist.Average, name="g")
    for _ in range(3):
        iteration()
    t = time.perf_counter()
    for _ in range(iters):
        iteration()
    if dist.rank() == 0:
        Path(out).write_text(json.dumps({"ms": (time.perf_counter() - t) / iters * 1e3}))


def horovodrun(np_: int, argv: list[str], mode: str, timeout: float = 900, controller: str = "mpi") -> None:
    run_job(np_, argv, controller, timeout, env={"HVD_MEGDET_PROCESS_SETS": mode})


def measure_floor(np_: int, mode: str, controller: str, iters: int = 15) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        horovodrun(np_, [__file__, "--iters", str(iters), "--worker", f"{tmp}/f.json", "--floor"], mode,
                   controller=controller)
        return {"np": np_, "mode": mode, "controller": controller,
                "floor_ms": round(json.loads(Path(tmp, "f.json").read_text())["ms"], 1)}


def measure(np_: int, mode: str, iters: int, train_iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        horovodrun(np_, [__file__, "--iters", str(iters), "--worker", f"{tmp}/s.json"], mode)
        syncbn_ms = json.loads(Path(tmp, "s.json").read_text())["ms"]
        horovodrun(np_, [str(REPO / "scripts/train.py"), "--output-dir", f"{tmp}/run", "solver.images_per_rank=2",
                         f"solver.reference_batch={2 * np_}", f"solver.max_iter={train_iters}",
                         f"solver.steps=[{train_iters - 1}]", "solver.warmup_iters=5", "model.bn_group_size=2",
                         f"train.log_period={train_iters}", "train.num_visualizations=0", "train.eval_images=4",
                         "train.checkpoint_period=100000", "train.threads_per_rank=1"], mode)
        rec = json.loads(Path(tmp, "run", "metrics.jsonl").read_text().splitlines()[-1])
    return {"np": np_, "mode": mode, "syncbn_r50_ms": round(syncbn_ms, 1),
            "train_images_per_s": round(rec["it_per_s"] * 2 * np_, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "process_sets.json"))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="SyncBN passes timed")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return (floor_worker if args.floor else syncbn_worker)(args.iters, args.worker)
    floor = []
    for rep in range(args.reps):  # the collectives alone, under both controllers
        for controller in ("mpi", "gloo"):
            for np_ in (2, 4):
                for mode in ("dynamic", "static") if rep % 2 == 0 else ("static", "dynamic"):
                    floor.append({"rep": rep, **measure_floor(np_, mode, controller)})
                    print(json.dumps(floor[-1]), flush=True)
    rows = []
    for rep in range(args.reps):
        for np_ in (2, 4):
            for mode in ("dynamic", "static") if rep % 2 == 0 else ("static", "dynamic"):
                rows.append({"rep": rep, **measure(np_, mode, args.iters, args.train_iters)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for np_ in (2, 4):
        med = {m: {k: statistics.median(r[k] for r in rows if r["np"] == np_ and r["mode"] == m)
                   for k in ("syncbn_r50_ms", "train_images_per_s")} for m in ("dynamic", "static")}
        summary[f"np{np_}"] = {**med, "syncbn_dynamic_over_static": round(med["dynamic"]["syncbn_r50_ms"] /
                                                                          med["static"]["syncbn_r50_ms"], 2),
                               "train_static_over_dynamic": round(med["static"]["train_images_per_s"] /
                                                                  med["dynamic"]["train_images_per_s"], 2)}
    print(json.dumps(summary, indent=1))
    Path(args.output).write_text(json.dumps({"controller": "mpi", "bn_group_ranks": 2, "images_per_rank": 2,
                                             "rows": rows, "summary": summary, "floor": floor}, indent=1) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
