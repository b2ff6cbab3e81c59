"""What the experiments in this folder share: launching a job of this repository on local ranks
(the environment and the group kill are hvd_megdet.localjob's, as in the tests), timed medians,
and the BN layer shapes of the models they measure. Experiments import it as ``common`` (their
own folder is first on ``sys.path`` when run as ``python scripts/experiments/NAME.py``)."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's package, whatever an editable install points at
from hvd_megdet import localjob  # noqa: E402

BIN = localjob.BIN


def horovodrun(np: int, argv: list[str], controller: str = "mpi", timeout: float = 900, threads: int = 1,
               env: dict | None = None, check: bool = True):
    """``horovodrun -np N --controller python ARGV`` on this machine, killed whole past ``timeout``.
    ``check``: a non-zero exit raises with the end of the job's output. Returns the
    CompletedProcess (output in ``stdout``)."""
    cmd = localjob.horovodrun(np, controller, [sys.executable, *map(str, argv)])
    res = localjob.run(cmd, timeout, localjob.job_env(threads, env))
    if check and res.returncode != 0:
        raise SystemExit(f"job failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout[-4000:]}")
    return res


def timed(fn: Callable[[], None], iters: int, warmup: int, before: Callable[[], None] | None = None,
          after: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones. ``before`` runs
    before the clock starts (a barrier, a device sync), ``after`` before it stops (a device sync)."""
    samples = []
    for k in range(warmup + iters):
        if before:
            before()
        t = time.perf_counter()
        fn()
        if after:
            after()
        if k >= warmup:
            samples.append(time.perf_counter() - t)
    return samples


def median_ms(samples: list[float]) -> float:
    return round(1e3 * statistics.median(samples), 3)


def layer_shapes(model_name: str, image_hw: tuple[int, int] | None = None, device: str = "cpu"):
    """(N, C, H, W) of every BN layer's input, from hooks on one forward. ``image_hw`` replaces the
    default input size; ``device="meta"`` gives the shapes without computing anything."""
    import torch
    from torch import nn

    from hvd_megdet import config
    from hvd_megdet.model import build_backbone

    shapes = []
    if model_name == "resnet50":
        import torchvision
        model, x = torchvision.models.resnet50(weights=None), torch.randn(2, 3, *(image_hw or (64, 64)))
    else:
        m = config.load("shapes_tiny").model
        model = build_backbone(type(m)(**{**m.__dict__, "norm": "bn"})).body
        x = torch.randn(4, 3, *(image_hw or (128, 128)))
    model, x = model.to(device), x.to(device)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    with torch.no_grad():
        model(x)
    return shapes


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file the engine writes (metrics.jsonl, runs.jsonl, eval/history.jsonl)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
