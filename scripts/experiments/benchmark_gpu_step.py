#!/usr/bin/env python
"""The measuring steps of scripts/gpu_check.sh, one subcommand each; every one writes its figures
as JSON to ``--out`` (read by ``record``, which files them into gpu.json). Run by gpu_check.sh as
``python scripts/experiments/benchmark_gpu_step.py SUBCOMMAND ...``.

    benchmark_gpu_step.py record --json gpu.json --step NAME --rc RC --seconds S [--figures F] [--log L]
    benchmark_gpu_step.py meta --json gpu.json --set JSON | setup-figures --json gpu.json --log SETUP_LOG
    benchmark_gpu_step.py facts      --out F                       (no Horovod needed; its facts if importable)
    benchmark_gpu_step.py kernels    --out F [--image 800x1216]     (no Horovod needed)
    benchmark_gpu_step.py syncbn     --out F [--image 800x1216] [--iters 10]
    benchmark_gpu_step.py megdet     --out F --output-dir DIR [--variants a,b,...] [--latency-iters N] [key=value ...]
    benchmark_gpu_step.py peer       --out F --output-dir DIR [--iters 10] [--warmup 5] [--modes fp32,amp] [k=v ...]
    benchmark_gpu_step.py run-figures --out F --output-dir DIR

All of them run on the device the project's ``train.device=auto`` picks (CUDA where usable, else
the CPU: gpu_check.sh --rehearse). ``kernels`` checks torch's four fused BN kernels, called as
SyncBatchNorm's fused path calls them, against nn.BatchNorm2d, before Horovod is installed. At
np=1: ``syncbn`` runs SyncBatchNorm's group path (plain and
fused) with real Horovod collectives (an explicit ``dist.global_set()``) against nn.BatchNorm2d;
``megdet`` runs the project's Trainer in this process, one variant after another (norm, SyncBN
implementation, AMP), SyncBN's group path forced onto the global set so that its two collectives
per layer run through Horovod (NCCL on a GPU) even at world size 1; ``peer`` runs torchvision's
own fasterrcnn_resnet50_fpn training step on the same images (no Horovod: it runs even when
Horovod's install failed). Timings are medians of >= 10 iterations after warm-up, with the device
synchronised around the timed region. Figures are saved after every variant, dtype or mode:
a step cut at its time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import layer_shapes, median_ms, read_jsonl, timed


OUT: list[str] = []  # the running subcommand's --out: partial figures are saved there as they come


def save(figures: dict) -> None:
    if OUT:
        write_json(OUT[0], figures)


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# --- record (stdlib only: works when torch or horovod do not) ---------------

def record(args) -> None:
    """File one step's outcome into gpu.json (rewritten after every step: a run killed at its time
    limit still leaves everything measured before)."""
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() else {"steps": {}}
    figures = {}
    if args.figures and Path(args.figures).exists():
        try:
            figures = json.loads(Path(args.figures).read_text())
        except ValueError as e:
            figures = {"unreadable": str(e)}
    status = {0: "ok", 124: "timeout", 137: "timeout", 125: "skipped"}.get(args.rc, "failed")
    error = None
    if status != "ok":
        tail = Path(args.log).read_text(errors="replace").splitlines()[-25:] if args.log and \
            Path(args.log).exists() else []
        head = f"timed out after {args.seconds:.0f}s" if status == "timeout" else f"exit {args.rc}"
        error = args.why or "\n".join([head, *tail])
    doc["steps"][args.step] = {"ok": status == "ok", "status": status, "rc": args.rc,
                               "seconds": round(args.seconds, 2), "figures": figures, "error": error}
    write_json(path, doc)
    print(f"[gpu_check] {args.step}: {status} in {args.seconds:.1f}s", flush=True)


def meta(args) -> None:
    """Top-level facts of the run (mode, start, end) into gpu.json."""
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() else {"steps": {}}
    doc.update(json.loads(args.set))
    write_json(path, doc)


def setup_figures(args) -> None:
    """Adds to the install step's figures what scripts/setup.sh printed: the build's cache key, the
    NCCL that CMake found, the `horovodrun --check-build` table, the total time."""
    lines = Path(args.log).read_text(errors="replace").splitlines()
    f = {}
    for line in lines:
        s = line.strip()
        if s.startswith("cache key"):
            f["cache_key"] = s.split(None, 2)[-1]
        elif "Found NCCL (include:" in s:
            f["nccl_found"] = s
        elif s.startswith("setup done in"):
            f["setup_s"] = int(s.split()[3].rstrip("s;"))
        elif s.startswith("== building horovod") or s.startswith("cached wheel") or s == "prerequisites ok":
            f.setdefault("notes", []).append(s)
    if "== horovodrun --check-build" in lines:
        rest = lines[lines.index("== horovodrun --check-build") + 1:]
        f["check_build"] = [s for s in rest if s.strip() and not s.startswith("setup done")]
    path = Path(args.json)
    doc = json.loads(path.read_text())
    if "install" in doc["steps"]:
        doc["steps"]["install"]["figures"].update(f)
        write_json(path, doc)


# --- shared helpers -----------------------------------------------------------

def device():
    """This process's device, as the trainer's ``train.device=auto`` chooses it on one rank: the
    first CUDA GPU where torch can use one, else the CPU (no Horovod: the peer runs without it)."""
    import torch
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev) -> float | None:
    import torch
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def set_device_override(overrides: list[str], dev) -> list[str]:
    """``train.device`` matching ``dev`` unless given (megdet_r50_fpn says cuda: a CPU rehearsal
    must say cpu)."""
    if any(o.startswith("train.device=") for o in overrides):
        return list(overrides)
    return [*overrides, f"train.device={dev.type}"]


# --- facts --------------------------------------------------------------------

def facts(args) -> dict:
    import torch
    import torchvision

    f = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "torch_cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available(),
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        f["torch_nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001 - a fact, not a failure
        f["torch_nccl"] = f"unavailable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count)
    try:
        f["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        f["nvidia_smi"] = f"unavailable: {e}"
    try:  # before Horovod's install this step records the machine alone
        from hvd_megdet import dist, launch
    except ImportError as e:
        f["horovod"] = f"not importable: {e}"
        return f
    f.update(launch.build_facts())
    horovodrun = Path(sys.executable).parent / "horovodrun"
    if horovodrun.exists():
        out = subprocess.run([str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120)
        f["check_build"] = out.stdout.strip().splitlines()
    launch.init()
    f.update(controller=launch.controller(), size=dist.size(),
             async_completion=os.environ.get("HOROVOD_ENABLE_ASYNC_COMPLETION"))
    return f


# --- SyncBN (plain, fused) vs BatchNorm2d ------------------------------------------

def syncbn(args) -> dict:
    """ResNet-50's 53 BN layers (input shapes of 2 images of ``--image``): one forward+backward over
    all layers with nn.BatchNorm2d and with SyncBatchNorm's group path (plain and fused; fused on
    CUDA only), in fp32 and under fp16/bf16 autocast (inputs in the autocast dtype, as convolutions
    produce them). Max errors of the outputs and input gradients against BatchNorm2d, median time,
    peak memory above the inputs."""
    import torch

    from hvd_megdet import launch

    launch.init()
    dev = device()
    h, w = (int(v) for v in args.image.split("x"))
    shapes = layer_shapes("resnet50", (h, w), device="meta")[:args.layers or None]
    torch.manual_seed(0)
    kinds = ["bn", "plain"] + (["fused"] if dev.type == "cuda" else [])
    res = {"device": str(dev), "layers": len(shapes), "input": f"2x3x{h}x{w}", "iters": args.iters,
           "elements": sum(torch.Size(s).numel() for s in shapes), "kinds": kinds}
    if dev.type != "cuda":
        res["fused"] = "skipped: torch's fused BN kernels need CUDA"
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        try:
            res[name] = _bn_compare(shapes, dtype, dev, args.iters, kinds)
        except Exception as e:  # noqa: BLE001 - one dtype failing must not lose the others
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        save(res)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    failed = [k for k in ("fp32", "fp16", "bf16") if "error" in res[k]]
    if failed:
        res["failed"] = failed
    return res


def _bn_compare(shapes, dtype, dev, iters, kinds) -> dict:
    """SyncBatchNorm's group path over Horovod's global set (real collectives, over this one rank:
    the sums, hence the results, are those of one process) against nn.BatchNorm2d."""
    import torch
    from torch import nn

    from hvd_megdet import dist
    from hvd_megdet.sync_bn import SyncBatchNorm
    autocast = dtype != torch.float32
    # |mean|/std ~ 2 like real activations after a ReLU; weights and biases away from 1/0
    xs = [(torch.randn(s, device=dev) + 2.0).to(dtype).requires_grad_() for s in shapes]
    gs = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    layers = {"bn": [nn.BatchNorm2d(s[1]).to(dev) for s in shapes]}
    for impl in kinds[1:]:
        layers[impl] = [SyncBatchNorm(s[1], process_set=dist.global_set(), impl=impl).to(dev) for s in shapes]
    with torch.no_grad():
        for group in zip(*layers.values()):
            group[0].weight.uniform_(0.5, 1.5)
            group[0].bias.uniform_(-0.5, 0.5)
            for b in group[1:]:
                b.weight.copy_(group[0].weight)
                b.bias.copy_(group[0].bias)

    def one_pass(kind, keep=False):
        outs = []
        for layer, x, g in zip(layers[kind], xs, gs):
            x.grad = None
            with torch.autocast(dev.type, dtype=dtype, enabled=autocast):
                y = layer(x)
            y.backward(g)
            if keep:
                outs.append((y.detach().float(), x.grad.float()))
        return outs

    out = {}
    ref = one_pass("bn", keep=True)
    out["max_abs_dx"] = max(float(a[1].abs().max()) for a in ref)
    for kind in kinds[1:]:
        got = one_pass(kind, keep=True)
        out[f"{kind}_max_abs_err_y"] = max(float((a[0] - b[0]).abs().max()) for a, b in zip(ref, got))
        out[f"{kind}_max_abs_err_dx"] = max(float((a[1] - b[1]).abs().max()) for a, b in zip(ref, got))
        out[f"{kind}_max_abs_err_dweight"] = max(float((a.weight.grad - b.weight.grad).abs().max())
                                                 for a, b in zip(layers["bn"], layers[kind]))
        del got
    del ref
    for kind in kinds:
        samples = timed(lambda: one_pass(kind), iters, warmup=2 if iters >= 5 else 1,
                        before=lambda: sync(dev), after=lambda: sync(dev))
        out[f"{kind}_ms"] = median_ms(samples)
        if dev.type == "cuda":
            base = torch.cuda.memory_allocated(dev)
            reset_peak(dev)
            one_pass(kind)
            sync(dev)
            out[f"{kind}_peak_extra_gib"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**30, 3)
    for kind in kinds[1:]:
        out[f"{kind}_over_bn"] = round(out[f"{kind}_ms"] / out["bn_ms"], 3)
    return out


def kernels(args) -> dict:
    """torch's fused BN kernels as SyncBatchNorm(impl="fused") calls them on one rank (batch_norm_stats,
    batch_norm_elemt; batch_norm_backward_reduce, batch_norm_backward_elemt with an int32 count), against
    nn.BatchNorm2d's training forward and autograd backward, on ResNet-50's BN shapes, fp32 and fp16/bf16
    inputs with fp32 parameters (AMP). Needs no Horovod: it runs before the install."""
    import torch
    from torch import nn

    dev = device()
    if dev.type != "cuda":
        return {"device": str(dev), "skipped": "torch's fused BN kernels need CUDA"}
    h, w = (int(v) for v in args.image.split("x"))
    shapes = layer_shapes("resnet50", (h, w), device="meta")
    res = {"device": str(dev), "layers": len(shapes), "input": f"2x3x{h}x{w}"}
    eps = 1e-5
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        errs = {"y": 0.0, "dx": 0.0, "dweight": 0.0, "dbias": 0.0, "max_abs_dx": 0.0}
        try:
            for s in shapes:
                torch.manual_seed(0)
                x = (torch.randn(s, device=dev) + 2.0).to(dtype)
                dy = torch.randn(s, device=dev).to(dtype)
                ref = nn.BatchNorm2d(s[1], eps=eps).to(dev)
                with torch.no_grad():
                    ref.weight.uniform_(0.5, 1.5)
                    ref.bias.uniform_(-0.5, 0.5)
                xr = x.detach().requires_grad_()
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    yr = ref(xr)
                yr.backward(dy)
                wt, bs = ref.weight.detach(), ref.bias.detach()
                mean, invstd = torch.batch_norm_stats(x, eps)
                y = torch.batch_norm_elemt(x, wt, bs, mean, invstd, eps)
                sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(dy, x, mean, invstd, wt, True, True, True)
                count = torch.tensor([x.numel() // s[1]], dtype=torch.int32, device=dev)
                dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, wt, sum_dy, sum_dy_xmu, count)
                for k, a, b in (("y", y, yr), ("dx", dx, xr.grad), ("dweight", gw, ref.weight.grad),
                                ("dbias", gb, ref.bias.grad)):
                    errs[k] = max(errs[k], float((a.float() - b.float()).abs().max()))
                errs["max_abs_dx"] = max(errs["max_abs_dx"], float(xr.grad.float().abs().max()))
            res[name] = {f"max_abs_err_{k}" if k != "max_abs_dx" else k: round(v, 8) for k, v in errs.items()}
        except Exception as e:  # noqa: BLE001 - one dtype failing must not lose the others
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        save(res)
    failed = [k for k in ("fp32", "fp16", "bf16") if "error" in res[k]]
    if failed:
        res["failed"] = failed
    return res


def latency(iters: int) -> dict:
    """Latency of one synchronous ``hvd.allreduce`` of a (2C+1)-value fp64 tensor (a SyncBN forward's
    payload): idle, and issued right after queued GPU work. Without async completion a CUDA
    allreduce returns only after that work (the "drain" SyncBN pays twice per layer); with it, the
    call returns and the device orders the rest."""
    import torch

    from hvd_megdet import dist, launch
    dev = device()
    res = {"controller": launch.controller(), "size": dist.size(),
           "cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
           "async_completion": os.environ.get("HOROVOD_ENABLE_ASYNC_COMPLETION")}
    # ~10 ms of queued matrix products on an H100/H200 (8 x 1.1 TFLOP in bf16); a token amount on a CPU
    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)

    def work():
        for _ in range(8):
            a @ a

    work()
    sync(dev)
    t = time.perf_counter()
    work()
    sync(dev)
    res["work_ms"] = round(1e3 * (time.perf_counter() - t), 3)
    for c in (256, 2048):
        x = torch.zeros(2 * c + 1, dtype=torch.float64, device=dev)
        idle, after = [], []
        for k in range(iters + 10):
            sync(dev)
            t = time.perf_counter()
            dist.allreduce(x, op=dist.Sum, name=f"lat.{c}", process_set=dist.global_set())
            sync(dev)
            if k >= 10:
                idle.append(time.perf_counter() - t)
        for k in range(max(iters // 10, 5)):
            sync(dev)
            work()  # queued, not waited for
            t = time.perf_counter()
            dist.allreduce(x, op=dist.Sum, name=f"lat.{c}", process_set=dist.global_set())
            after.append(time.perf_counter() - t)  # the call's return, not the device's completion
        sync(dev)
        res[f"C{c}"] = {"values": 2 * c + 1, "idle_ms": median_ms(idle),
                        "idle_p90_ms": round(1e3 * sorted(idle)[int(0.9 * len(idle))], 3),
                        "call_after_work_ms": median_ms(after)}
    return res


# --- training steps -------------------------------------------------------------

def s_per_iter(metrics_file: Path, warmup: int | None = None) -> dict:
    """Seconds per iteration from metrics.jsonl's wall-clock times (each written after the
    iteration's one device-to-host read, so consecutive stamps are a whole iteration apart): the
    median over the logged intervals after ``warmup`` iterations (default: the second half; a
    resumed run appends to the file: the gap between runs is one interval, which the median ignores)."""
    rows = read_jsonl(metrics_file)
    if not rows:
        return {}
    out = {"iterations": rows[-1]["iteration"], "loss": round(rows[-1]["loss"], 4)}
    rates = [(b["time"] - a["time"]) / (b["iteration"] - a["iteration"]) for a, b in zip(rows, rows[1:])
             if b["iteration"] > a["iteration"] and (warmup is None or a["iteration"] >= warmup)]
    if rates:
        out["s_per_iter"] = round(statistics.median(rates if warmup is not None else rates[len(rates) // 2:]), 4)
        out["timed_iterations"] = len(rates) if warmup is not None else len(rates) - len(rates) // 2
    return out


def run_figures(args) -> dict:
    """What a scripts/train.py run left in its output dir: progress, losses, checkpoints, COCO AP."""
    out_dir = Path(args.output_dir)
    f = {"output_dir": str(out_dir)}
    if (out_dir / "metrics.jsonl").exists():
        f.update(s_per_iter(out_dir / "metrics.jsonl"))
    if (out_dir / "eval" / "metrics.json").exists():
        m = json.loads((out_dir / "eval" / "metrics.json").read_text())
        f["eval"] = {k: m[k] for k in ("AP", "AP50", "iteration") if k in m}
    f["checkpoints"] = sorted(p.name for p in (out_dir / "checkpoints").glob("*.pth"))
    runs = read_jsonl(out_dir / "runs.jsonl")  # one record per start of training or evaluation
    f["resumed"] = [r["resumed_from"] for r in runs if r["kind"] == "train" and r.get("resumed_from")]
    f["loaded"] = [r["checkpoint"] for r in runs if r["kind"] == "evaluate" and r.get("checkpoint")]  # --eval-only
    f["device_line"] = runs[-1]["device"] if runs else None
    return f


# the megdet step's variants: (model.norm, model.syncbn_impl, solver.amp)
VARIANTS = {"syncbn_plain": ("syncbn", "plain", False), "syncbn_fused": ("syncbn", "fused", False),
            "bn": ("bn", "plain", False), "frozen": ("frozen", "plain", False),
            "syncbn_plain_amp": ("syncbn", "plain", True), "syncbn_fused_amp": ("syncbn", "fused", True),
            "bn_amp": ("bn", "plain", True), "frozen_amp": ("frozen", "plain", True)}


def megdet(args) -> dict:
    """The project's Trainer in this process (as scripts/train.py runs it), one variant after
    another, each into its own output dir: s/iter (median after ``--warmup`` iterations), peak
    memory, and the SyncBN collectives it issued. SyncBN's group path is forced onto Horovod's global
    set (at world size 1 it would otherwise be plain local BN, with no collective)."""
    import gc

    import torch

    from hvd_megdet import app, config, dist
    from hvd_megdet.engine import Trainer
    from hvd_megdet.sync_bn import SyncBatchNorm

    dev = device()
    app.start_horovod()
    res = {"device": str(dev), "latency": latency(args.latency_iters), "variants": {}}
    save(res)
    issued = {"n": 0}
    real_allreduce = dist.allreduce

    def counting(tensor, *a, name=None, **k):  # the real collective, counted
        if name and name.startswith("syncbn."):
            issued["n"] += 1
        return real_allreduce(tensor, *a, name=name, **k)
    dist.allreduce = counting
    for name in args.variants.split(","):
        norm, impl, amp = VARIANTS[name]
        if impl == "fused" and dev.type != "cuda":
            res["variants"][name] = {"skipped": "torch's fused BN kernels need CUDA"}
            continue
        try:
            cfg = config.load(args.config, set_device_override(
                [*args.overrides, f"model.norm={norm}", f"model.syncbn_impl={impl}", f"solver.amp={str(amp).lower()}"],
                dev))
            out, log = app.start(cfg, str(Path(args.output_dir) / name))
            trainer = Trainer(cfg, out, log)
            layers = [m for m in trainer.model.modules() if isinstance(m, SyncBatchNorm)]
            for m in layers:
                m.process_set = dist.global_set()
            issued["n"] = 0
            sync(dev)
            reset_peak(dev)
            t = time.perf_counter()
            code = trainer.train()
            sync(dev)
            f = {"exit": code, "wall_s": round(time.perf_counter() - t, 1), "norm": norm, "impl": impl,
                 "amp": amp and dev.type == "cuda", "image": f"{cfg.data.shapes_image_size}x"
                 f"{cfg.data.shapes_width or cfg.data.shapes_image_size}", "images_per_iter": cfg.solver.images_per_rank,
                 "peak_gib": peak_gib(dev), "syncbn_layers": len(layers), "syncbn_collectives": issued["n"],
                 **s_per_iter(out / "metrics.jsonl", args.warmup)}
            f["syncbn_collectives_per_iter"] = round(issued["n"] / max(f.get("iterations", 1), 1), 2)
            res["variants"][name] = f
            del trainer
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            res["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:800]}
        save(res)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    dist.allreduce = real_allreduce
    failed = [k for k, v in res["variants"].items() if "error" in v]
    if failed:
        res["failed"] = failed
    return res


def peer(args) -> dict:
    """torchvision's own fasterrcnn_resnet50_fpn (random weights, BatchNorm2d, all layers trained,
    as torchvision builds it without pretrained weights) on the same images, batch and sizes as the
    ``megdet`` step's config, in fp32 and with AMP: its training step time and peak memory. Needs
    no Horovod (the package's data code only)."""
    import torch

    from hvd_megdet import config, data

    dev = device()
    cfg = config.load(args.config, args.overrides)
    data.prepare(cfg.data)
    ds = data.train_dataset(cfg.data)
    res = {"device": str(dev), "image": f"{cfg.data.shapes_image_size}x{cfg.data.shapes_width or cfg.data.shapes_image_size}",
           "images_per_iter": cfg.solver.images_per_rank}
    for mode in args.modes.split(","):
        try:
            res[mode] = _peer_steps(cfg, ds, dev, mode == "amp" and dev.type == "cuda", args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 - one mode failing must not lose the other
            res[mode] = {"error": f"{type(e).__name__}: {e}"[:800]}
        save(res)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    failed = [m for m in args.modes.split(",") if "error" in res[m]]
    if failed:
        res["failed"] = failed
    return res


def _peer_steps(cfg, ds, dev, amp: bool, warmup: int, iters: int) -> dict:
    import torch
    import torchvision

    from hvd_megdet import data
    from hvd_megdet.data.transforms import to_device
    batch = cfg.solver.images_per_rank
    batches = iter(data.train_loader(ds, cfg.data, batch, 0, 1, cfg.train.seed, 0))
    torch.manual_seed(cfg.train.seed)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=ds.num_classes,
        min_size=cfg.data.min_size, max_size=cfg.data.max_size).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.solver.base_lr * batch / cfg.solver.reference_batch,
                          momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    reset_peak(dev)
    times, losses = [], []
    for _ in range(warmup + iters):
        images, targets = to_device(*next(batches), dev)
        sync(dev)  # the timed region: one whole step, the device synchronised at both ends
        t = time.perf_counter()
        with torch.autocast(dev.type, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(float(loss))  # a host read per step, as any training loop that logs
        sync(dev)
        times.append(time.perf_counter() - t)
    steady = times[warmup:] or times
    return {"amp": amp, "iterations": warmup + iters, "timed_iterations": len(steady),
            "s_per_iter": round(statistics.median(steady), 4), "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4), "peak_gib": peak_gib(dev)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--json", required=True)
    r.add_argument("--step", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--figures")
    r.add_argument("--log")
    r.add_argument("--why", help="the error text when there is no log (e.g. skipped)")
    m = sub.add_parser("meta")
    m.add_argument("--json", required=True)
    m.add_argument("--set", required=True, help="JSON merged into the top level of gpu.json")
    m = sub.add_parser("setup-figures")
    m.add_argument("--json", required=True)
    m.add_argument("--log", required=True)
    for name in ("facts", "kernels", "syncbn", "megdet", "peer", "run-figures"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        if name == "kernels":
            s.add_argument("--image", default="800x1216")
        if name == "syncbn":
            s.add_argument("--image", default="800x1216")
            s.add_argument("--iters", type=int, default=10)
            s.add_argument("--layers", type=int, default=0, help="the first N BN layers only (0 = all 53)")
        if name in ("megdet", "peer", "run-figures"):
            s.add_argument("--output-dir", required=True)
        if name in ("megdet", "peer"):
            s.add_argument("--config", default="megdet_r50_fpn")
            s.add_argument("--warmup", type=int, default=10 if name == "megdet" else 5,
                           help="iterations before the timed ones")
            s.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "megdet":
            s.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
            s.add_argument("--latency-iters", type=int, default=200)
        if name == "peer":
            s.add_argument("--iters", type=int, default=10, help="timed iterations")
            s.add_argument("--modes", default="fp32,amp", help="fp32 and/or amp (AMP on CUDA only)")
    args = p.parse_args()
    if args.cmd in ("record", "meta", "setup-figures"):  # stdlib only
        return {"record": record, "meta": meta, "setup-figures": setup_figures}[args.cmd](args)
    fn = {"facts": facts, "kernels": kernels, "syncbn": syncbn, "megdet": megdet, "peer": peer,
          "run-figures": run_figures}[args.cmd]
    OUT.append(args.out)
    figures = fn(args)
    write_json(args.out, figures)
    print(json.dumps(figures, default=str)[:2000], flush=True)
    if figures.get("failed"):
        raise SystemExit(f"failed: {figures['failed']}")


if __name__ == "__main__":
    main()
