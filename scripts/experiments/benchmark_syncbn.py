#!/usr/bin/env python
"""SyncBN cost on 2 CPU ranks: local BatchNorm2d vs SyncBatchNorm vs the bare allreduce floor.

    python scripts/experiments/benchmark_syncbn.py [--output benchmarks/syncbn.json] [--iters 10]

For the BN layer shapes of a ResNet-50 (all 53 layers, 64 px input, 2 images per
rank) and of the tiny demo backbone (128 px, 4 images per rank), it times one
forward+backward over all layers with (a) local BatchNorm2d, (b) SyncBatchNorm
over both ranks, (c) the floor: the same number of ``hvd.allreduce`` calls with
the same payloads and nothing else — under the MPI and Gloo controllers and
several ``HOROVOD_CYCLE_TIME`` values. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, horovodrun, layer_shapes, median_ms, timed

SETTINGS = [("mpi", "1"), ("mpi", "0.1"), ("gloo", "1"), ("gloo", "0.1")]


def worker(iters: int, out: str) -> None:
    import torch
    from torch import nn

    from hvd_megdet import dist, launch
    from hvd_megdet.sync_bn import SyncBatchNorm

    torch.set_num_threads(1)
    launch.init()
    result = {}
    for model_name in ("resnet50", "tiny"):
        shapes = layer_shapes(model_name)
        xs = [torch.randn(s, requires_grad=True) for s in shapes]
        gs = [torch.randn(s) for s in shapes]

        def bn_pass(layers):
            for layer, x, g in zip(layers, xs, gs):
                layer(x).backward(g)

        local = [nn.BatchNorm2d(s[1]) for s in shapes]
        sync = [SyncBatchNorm(s[1]) for s in shapes]
        fwd = [torch.zeros(2 * s[1] + 1, dtype=torch.float64) for s in shapes]
        bwd = [torch.zeros(2 * s[1]) for s in shapes]

        def floor_pass():
            for i, (f, b) in enumerate(zip(fwd, bwd)):
                dist.allreduce(f, op=dist.Sum, name=f"floor.{i}.f")
                dist.allreduce(b, op=dist.Sum, name=f"floor.{i}.b")

        timings = {}
        for name, fn in (("local_bn", lambda: bn_pass(local)), ("sync_bn", lambda: bn_pass(sync)),
                         ("floor", floor_pass)):
            samples = timed(fn, iters, warmup=3, before=dist.barrier)
            # the slower rank bounds the step: take the max over ranks of each median
            timings[name] = max(dist.allgather_object(median_ms(samples)))
        result[model_name] = {"layers": len(shapes), **timings}
    if dist.rank() == 0:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "syncbn.json"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.iters, args.worker)
    rows = []
    for controller, cycle in SETTINGS:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            horovodrun(2, [__file__, "--iters", args.iters, "--worker", tmp.name], controller,
                       env={"HOROVOD_CYCLE_TIME": cycle})
            res = json.loads(Path(tmp.name).read_text())
        for model_name, r in res.items():
            overhead = r["sync_bn"] - r["local_bn"]
            rows.append({"controller": controller, "cycle_time_ms": float(cycle), "model": model_name, **r,
                         "overhead_ms": overhead, "sync_over_local": r["sync_bn"] / r["local_bn"],
                         "overhead_over_floor": overhead / r["floor"]})
    head = f"{'controller':>10} {'cycle ms':>8} {'model':>8} {'layers':>6} {'local BN':>9} {'SyncBN':>9} " \
           f"{'floor':>8} {'Sync/local':>10} {'overhead/floor':>14}"
    print(head)
    for r in rows:
        print(f"{r['controller']:>10} {r['cycle_time_ms']:>8g} {r['model']:>8} {r['layers']:>6} "
              f"{r['local_bn']:>8.1f}ms {r['sync_bn']:>8.1f}ms {r['floor']:>6.1f}ms "
              f"{r['sync_over_local']:>10.2f} {r['overhead_over_floor']:>14.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"ranks": 2, "threads_per_rank": 1, "iters": args.iters,
                                             "rows": rows}, indent=1))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
