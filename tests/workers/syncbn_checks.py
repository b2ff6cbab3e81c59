"""SyncBatchNorm vs plain BatchNorm2d on the concatenated batch of each BN group.

Every rank builds the same full batch deterministically, runs SyncBN on its own
slice and the reference on its group's concatenation, and records, per case,
whether output, input gradient, weight/bias gradients (summed over the group)
and running statistics match. Launched by tests/test_sync_bn.py.
"""
import os

import torch
import horovod.torch as hvd
from torch import nn

from hvd_megdet import dist, launch, sync_bn
from hvd_megdet.errors import UserError
from hvd_megdet.sync_bn import SyncBatchNorm, average_running_stats, check_group_counts, convert_sync_batchnorm
from tests.workers.common import main
from tests.workers.fused_reference import ReferenceKernels

C, H, W = 8, 5, 4
COLLECTIVES = ("allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
               "allgather", "allgather_object", "broadcast", "broadcast_", "broadcast_object", "alltoall")
calls = {"n": 0}


def count_collectives():
    """Spy on every Horovod collective (the real ones still run)."""
    for name in COLLECTIVES:
        fn = getattr(hvd, name)

        def spy(*a, _fn=fn, **k):
            calls["n"] += 1
            return _fn(*a, **k)
        setattr(hvd, name, spy)


def close(a, b, tol):
    try:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, check_dtype=False)
        return None
    except AssertionError as e:
        return str(e)[:400]


def group_slices(counts, group):
    """Index ranges of every rank's slice; and this group's concatenated range."""
    offsets = [sum(counts[:r]) for r in range(len(counts) + 1)]
    return offsets, offsets[group[0]], offsets[group[-1] + 1]


def compare(counts, group_size, steps=3, momentum=0.1, dtype=torch.float32, mean=0.0, std=1.0,
            channels_last=False, tol=1e-5, ref_dtype=torch.float32, stat_tol=1e-5, impl="plain"):
    """One case: ``steps`` training iterations of SyncBN vs the reference. Returns a list of failures."""
    r = dist.rank()
    group = dist.bn_group_ranks(group_size)
    offsets, lo, hi = group_slices(counts, group)
    gen = torch.Generator().manual_seed(1234)
    sbn = SyncBatchNorm(C, momentum=momentum, group_size=group_size, impl=impl)
    ref = nn.BatchNorm2d(C, momentum=momentum).to(ref_dtype)
    with torch.no_grad():
        w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
        for m in (sbn, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    failures = []
    for step in range(steps):
        full = (torch.randn(sum(counts), C, H, W, generator=gen) * std + mean).to(dtype)
        g = torch.randn(sum(counts), C, H, W, generator=gen).to(dtype).float()  # dy as SyncBN sees it
        x = full[offsets[r]:offsets[r + 1]].clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        sbn.zero_grad()
        y = sbn(x)
        (y.float() * g[offsets[r]:offsets[r + 1]]).sum().backward()
        xr = full[lo:hi].to(ref_dtype).requires_grad_(True)
        ref.zero_grad()
        yr = ref(xr)
        (yr * g[lo:hi].to(ref_dtype)).sum().backward()
        mine = slice(offsets[r] - lo, offsets[r + 1] - lo)
        # weight/bias gradients: each rank holds its share; the group's sum is the reference's.
        shares = dist.allgather_object((sbn.weight.grad.tolist(), sbn.bias.grad.tolist()))
        gw = torch.tensor([shares[q][0] for q in group]).sum(0)
        gb = torch.tensor([shares[q][1] for q in group]).sum(0)
        otol = tol if dtype == torch.float32 else 2e-2
        for what, a, e, t in [("output", y, yr[mine], otol), ("grad_x", x.grad, xr.grad[mine], otol),
                              ("grad_w", gw, ref.weight.grad, tol * 10 if dtype != torch.float32 else tol),
                              ("grad_b", gb, ref.bias.grad, tol),
                              ("running_mean", sbn.running_mean, ref.running_mean, stat_tol),
                              ("running_var", sbn.running_var, ref.running_var, stat_tol)]:
            if a.dtype != e.dtype:
                a, e = a.double(), e.double()
            if what == "output" and y.dtype != dtype:
                failures.append(f"step {step}: output dtype {y.dtype} != input dtype {dtype}")
            err = close(a, e, t)
            if err:
                failures.append(f"step {step} {what}: {err}")
        if channels_last and not y.is_contiguous(memory_format=torch.channels_last) and y.numel():
            failures.append("channels_last input gave a non-channels_last output")
        if any(torch.isnan(t).any() for t in (y, x.grad, sbn.weight.grad)):
            failures.append(f"step {step}: NaN")
    return failures


def naive_variance_error(mean, std):
    """How far the fp32 E[x²]−E[x]² shortcut is from the truth for such data (shows the case bites)."""
    x = torch.randn(64, C, H, W, generator=torch.Generator().manual_seed(7)) * std + mean
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    exact = x.double().var((0, 2, 3), unbiased=False)
    return float(((naive.double() - exact).abs() / exact).max())


def checks(args):
    launch.init()
    n = dist.size()
    out = {"size": n}
    # A group size that does not divide the world: the same clear error on every rank, before any collective.
    bad = n + 1 if n > 1 else None
    if bad:
        try:
            launch.init(bn_group_size=bad)
            out["bad_group_error"] = None
        except dist.DistError as e:
            out["bad_group_error"] = str(e)
    out["nccl_streams"] = nccl_streams_refused()
    groups = [None] + ([2] if n == 4 else [])
    launch.init(bn_group_size=[k for k in groups if k])
    count_collectives()
    cases = {}
    uneven = [1, 3, 2, 4][:n] if n > 1 else [3]
    empty = [0] + [3] * (n - 1) if n > 1 else [2]
    for k in groups:
        tag = f"g{k or n}"
        cases[f"{tag}/equal"] = compare([2] * n, k)
        cases[f"{tag}/uneven"] = compare(uneven, k)
        cases[f"{tag}/empty_rank"] = compare(empty, k) if n > 1 else []
    cases["momentum_none"] = compare(uneven, None, momentum=None)
    cases["channels_last"] = compare(uneven, None, channels_last=True)
    # |mean|/std = 1e3 against a float64 reference: statistics to 1e-5; activations and gradients
    # are bounded by the fp32 input itself (ulp(1e4)/std = 1e-4), as for plain fp32 BatchNorm.
    cases["large_mean"] = compare(uneven, None, mean=1e4, std=10.0, ref_dtype=torch.float64, tol=1e-3)
    out["naive_large_mean_rel_error"] = naive_variance_error(1e4, 10.0)
    cases["fp16"] = compare(uneven, None, dtype=torch.float16, tol=2e-3)
    cases["bf16"] = compare(uneven, None, dtype=torch.bfloat16, tol=2e-2)
    out["fused_cpu_error"] = fused_cpu_error()
    # impl="fused": the same cases through its control flow, torch's CUDA-only kernels replaced by
    # reference ones (tests/workers/fused_reference.py)
    sync_bn.FUSED = ReferenceKernels()
    for k in groups:
        tag = f"fused/g{k or n}"
        cases[f"{tag}/equal"] = compare([2] * n, k, impl="fused")
        cases[f"{tag}/uneven"] = compare(uneven, k, impl="fused")
        cases[f"{tag}/empty_rank"] = compare(empty, k, impl="fused") if n > 1 else []
    cases["fused/channels_last"] = compare(uneven, None, channels_last=True, impl="fused")
    # the kernel's fp32 per-rank mean bounds the group variance at ~2e-5 here (sync_bn's docstring)
    cases["fused/large_mean"] = compare(uneven, None, mean=1e4, std=10.0, ref_dtype=torch.float64, tol=1e-3,
                                        stat_tol=1e-4, impl="fused")
    cases["fused/fp16"] = compare(uneven, None, dtype=torch.float16, tol=2e-3, impl="fused")
    out["fused_kernel_calls"] = dict(ReferenceKernels.calls)
    out["cases"] = cases

    # Collectives per layer per iteration (training), and none in eval.
    for impl in ("fused", "plain"):
        layers = nn.Sequential(SyncBatchNorm(C, impl=impl), nn.ReLU(), nn.Conv2d(C, C, 1), SyncBatchNorm(C, impl=impl),
                               nn.Conv2d(C, C, 1), SyncBatchNorm(C, impl=impl))
        x = torch.randn(2, C, H, W, requires_grad=True)
        before = calls["n"]
        layers(x).sum().backward()
        out[f"train_collectives_per_layer{'_fused' if impl == 'fused' else ''}"] = (calls["n"] - before) / 3
    layers.eval()
    before = calls["n"]
    with torch.no_grad():
        layers(x)
    out["eval_collectives"] = calls["n"] - before

    out["host_reads_in_forward"] = host_reads_in_training_forward(layers)
    out["group_count_error"] = group_count_error()
    # Running statistics made global: each rank holds its own, one collective averages all layers.
    with torch.no_grad():
        for i, m in enumerate(bn for bn in layers if isinstance(bn, SyncBatchNorm)):
            m.running_mean.fill_(dist.rank() + i)
            m.running_var.fill_(10.0 * dist.rank())
    before = calls["n"]
    average_running_stats(layers)
    out["average_collectives"] = calls["n"] - before
    mean_rank = (n - 1) / 2
    out["averaged_ok"] = all(
        torch.allclose(m.running_mean, torch.full((C,), mean_rank + i)) and
        torch.allclose(m.running_var, torch.full((C,), 10.0 * mean_rank))
        for i, m in enumerate(bn for bn in layers if isinstance(bn, SyncBatchNorm)))

    if n == 1:
        out["resnet50"] = resnet50_conversion()
    return out


def nccl_streams_refused() -> dict:
    """HOROVOD_NUM_NCCL_STREAMS > 1 with BN groups smaller than the world is refused before any
    collective (Horovod 0.28.1 would hang on GPUs); with a group of the whole world it is allowed."""
    res = {}
    os.environ["HOROVOD_NUM_NCCL_STREAMS"] = "2"
    try:
        for k in {1, dist.size()}:
            launch.init(bn_group_size=k)  # local BN and the whole world: no process set of its own
        res["whole_world_ok"] = True
        if dist.size() > 1 and dist.size() % 2 == 0 and dist.size() > 2:
            try:
                launch.init(bn_group_size=2)
                res["error"] = None
            except launch.LaunchSettingError as e:
                res["error"], res["user_error"] = str(e), isinstance(e, UserError)
    finally:
        del os.environ["HOROVOD_NUM_NCCL_STREAMS"]
    return res


def fused_cpu_error():
    """impl='fused' with torch's own kernels on a CPU tensor: a clear error, not torch's dispatch one."""
    layer = SyncBatchNorm(C, impl="fused", process_set=dist.global_set())
    try:
        layer(torch.randn(2, C, H, W))
        return None
    except RuntimeError as e:
        return str(e)


def host_reads_in_training_forward(layers) -> int:
    """Tensor -> Python reads (each a device synchronisation on a GPU) during a training forward."""
    layers.train()
    x = torch.randn(2, C, H, W)
    reads = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def spy(fn):
        def wrapped(*a, **k):
            reads["n"] += 1
            return fn(*a, **k)
        return wrapped
    for name, fn in saved.items():
        setattr(torch.Tensor, name, spy(fn))
    try:
        layers(x)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return reads["n"] if dist.size() > 1 else 0  # one process: plain BN, nothing to check


def group_count_error():
    """A BN group holding one value per channel: reported by check_group_counts, on every rank."""
    if dist.size() == 1:
        return "skipped"
    layer = nn.Sequential(SyncBatchNorm(C)).train()
    x = torch.randn(1 if dist.rank() == 0 else 0, C, 1, 1)
    layer(x)
    return check_group_counts(layer)


def resnet50_conversion():
    """convert_sync_batchnorm on torchvision's ResNet-50: nothing left behind, same outputs."""
    import copy

    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # non-trivial running stats, so that eval outputs depend on them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    conv = convert_sync_batchnorm(copy.deepcopy(model), group_size=None)
    x = torch.randn(2, 3, 64, 64)
    res = {"bn_left": sum(isinstance(m, nn.BatchNorm2d) for m in conv.modules()),
           "sync_bn": sum(isinstance(m, SyncBatchNorm) for m in conv.modules()),
           "bn_before": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
           "same_keys": sorted(model.state_dict()) == sorted(conv.state_dict())}
    with torch.no_grad():
        model.eval(), conv.eval()
        res["eval"] = close(conv(x), model(x), 1e-5)
        model.train(), conv.train()
        res["train"] = close(conv(x), model(x), 1e-5)
        res["running_after_train"] = close(conv.layer1[0].bn1.running_var, model.layer1[0].bn1.running_var, 1e-6)
    frozen = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    fconv = convert_sync_batchnorm(copy.deepcopy(frozen), convert_frozen=True).eval()
    with torch.no_grad():
        res["frozen_eval"] = close(fconv(x), frozen(x), 1e-5)
    res["frozen_left"] = sum(isinstance(m, FrozenBatchNorm2d) for m in fconv.modules())
    res["frozen_trainable"] = all(m.weight.requires_grad for m in fconv.modules() if isinstance(m, SyncBatchNorm))
    return res


if __name__ == "__main__":
    main(checks)
