"""Cross-GPU Batch Normalization (MegDet's CGBN) on ``hvd.allreduce``, over groups of ranks.

Training costs exactly two collectives per layer per iteration, both on the BN
group's process set:

* forward: one allreduce (fp64, 2C+1 values) of per-channel ``Σx``, ``Σx²`` and
  the count. Each rank sums its data shifted by one of its own values per channel
  (fp32, no cancellation) and converts to fp64, where ``E[x²] − E[x]²`` stays
  exact when |mean| ≫ std (the naive fp32 version loses it all at |mean|/std ≈ 1e3);
* backward: one allreduce (fp32, 2C values) of per-channel ``Σdy`` and
  ``Σdy·(x − μ)``.

Two implementations of the same two collectives (``model.syncbn_impl``):

* ``plain`` (the default, any device): torch's elementwise ops, ~8 passes over the
  activations forward and ~18 backward;
* ``fused`` (CUDA tensors only): torch's fused BN kernels (``batch_norm_stats``,
  ``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``),
  ~3 passes forward and ~5 backward. Each rank's mean and variance come from the
  kernel's Welford pass (no cancellation within a rank); they travel as the same
  fp64 ``Σx``, ``Σx²``, count (Chan's parallel formula written as sums). The kernel
  returns the rank's mean in fp32, whose rounding (|μ|·6e-8) enters the group
  variance as ~2·|μ|·6e-8·|μ_rank − μ|: 2e-5 relative at |μ|/σ = 1e3 (torch's own
  SyncBatchNorm has the same limit; the plain path's shift keeps 1e-6). The backward
  sums are ``Σdy`` and ``Σdy·(x − μ)`` (torch's convention).
  These kernels have no CPU implementation: the CPU tests run this path's control
  flow with reference kernels (tests/workers/fused_reference.py); a GPU validates
  the kernels (scripts/gpu_check.sh, step syncbn).

A rank may hold zero samples: it contributes zeros to both sums and still joins
both collectives, so nothing hangs. Weight and bias gradients are each rank's
local share (as ``torch.nn.SyncBatchNorm``): Horovod's gradient averaging then
yields the right update. Eval mode uses running statistics and no collective.

On a CPU this is the only synchronized BN available: ``torch.nn.SyncBatchNorm``
and ``hvd.SyncBatchNorm`` both refuse CPU tensors.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hvd_megdet import dist

_layer_ids = itertools.count()  # collective names: layers are built in the same order on every rank
IMPLS = ("plain", "fused")


class FusedKernels:
    """torch's fused BatchNorm kernels, the only ones ``impl="fused"`` calls (CUDA only; a test
    swaps in reference implementations to run this path's control flow on a CPU)."""
    stats = staticmethod(torch.batch_norm_stats)                      # (x, eps) -> mean, invstd
    elemt = staticmethod(torch.batch_norm_elemt)                      # (x, w, b, mean, invstd, eps) -> y
    backward_reduce = staticmethod(torch.batch_norm_backward_reduce)  # -> Σdy, Σdy(x-μ), dw, db
    backward_elemt = staticmethod(torch.batch_norm_backward_elemt)    # -> dx


FUSED = FusedKernels()


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel vector shaped to broadcast against ``x`` (N, C, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, count, process_set, name):
        # mean/var: the group's statistics (fp32), computed by the module without autograd.
        # Eval-mode batch_norm with them is the fused elementwise kernel, mixed precision included.
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.process_set, ctx.name = count, process_set, name
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _reduce_dims(x)
        dyf = dy.float()
        xhat = (x.float() - _bcast(mean, x)) * _bcast(invstd, x)
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * xhat).sum(dims)
        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)  # this rank's share, as torch.nn.SyncBatchNorm
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The layer's second and last collective: group sums of dy and dy·x̂.
            both = dist.allreduce(torch.cat([sum_dy, sum_dy_xhat]), op=dist.Sum,
                                  name=ctx.name + ".bwd", process_set=ctx.process_set)
            mean_dy, mean_dy_xhat = (both / ctx.count).chunk(2)
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = ((dyf - _bcast(mean_dy, x) - xhat * _bcast(mean_dy_xhat, x))
                      * _bcast(scale, x)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _FusedSyncBNFunction(torch.autograd.Function):
    """The same two collectives as :class:`_SyncBNFunction`, with torch's fused kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps, count, process_set, name):
        if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        # the kernel's count: int32 (from the fp64 total: exact to 2^31 values per channel)
        ctx.save_for_backward(x, weight, mean, invstd, count.round().to(torch.int32).view(1))
        ctx.process_set, ctx.name = process_set, name
        if x.numel() == 0:
            return torch.empty_like(x)
        return FUSED.elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and weight is not None
        if not dy.is_contiguous() and not dy.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous()
        grad_x = grad_w = grad_b = None
        if x.numel():
            sum_dy, sum_dy_xmu, grad_w, grad_b = FUSED.backward_reduce(dy, x, mean, invstd, weight,
                                                                      need_x, need_w, need_b)
        else:  # an empty rank: zero shares, and it still joins the collective
            c = mean.numel()
            sum_dy = sum_dy_xmu = torch.zeros(c, dtype=mean.dtype, device=mean.device)
            if weight is not None:
                grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(weight)
        if need_x:
            both = dist.allreduce(torch.cat([sum_dy.float(), sum_dy_xmu.float()]), op=dist.Sum,
                                  name=ctx.name + ".bwd", process_set=ctx.process_set)
            sum_dy, sum_dy_xmu = (t.contiguous() for t in both.chunk(2))
            grad_x = FUSED.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count) \
                if x.numel() else torch.zeros_like(x)
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None, None)


def local_sums(n: int, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``[Σx, Σx², n]`` in fp64 from a rank's count, mean and biased variance (the fused path's
    payload; the plain path builds the same vector from shifted sums)."""
    m, v = mean.double(), var.double()
    return torch.cat([n * m, n * (v + m * m), torch.full((1,), float(n), dtype=torch.float64, device=m.device)])


def group_moments(stats: torch.Tensor, c: int):
    """Group mean, biased variance (fp32) and count from the allreduced ``[Σx, Σx², n]`` (fp64)."""
    count = stats[-1]
    total = count.clamp(min=1.0)
    g_mean = stats[:c] / total
    g_var = (stats[c:2 * c] / total - g_mean * g_mean).clamp(min=0.0)
    return g_mean.float(), g_var.float(), count.float()


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``nn.BatchNorm2d`` whose training statistics span a group of ranks.

    ``group_size``: ranks per BN group (contiguous blocks); ``None`` = all ranks,
    1 = plain local BatchNorm (no communication). Groups other than 1 and the
    whole world must be registered with ``hvd_megdet.launch.init(bn_group_size=k)``.
    ``process_set``: an explicit Horovod process set instead (tools: ``dist.global_set()``
    runs the group path's real collectives even on one rank, to measure them).
    ``impl``: ``plain`` or ``fused`` (CUDA tensors only; see the module docstring).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group_size: int | None = None,
                 device=None, dtype=None, process_set=None, impl: str = "plain"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.group_size = group_size
        self.process_set = process_set
        self._name = f"syncbn.{next(_layer_ids)}"
        self.last_group_count: torch.Tensor | None = None  # values per channel in the last group batch

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, impl={self.impl}"

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def _momentum(self) -> float:
        """BatchNorm's factor: ``momentum``, or a cumulative average when it is None."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        process_set = None
        if use_batch_stats:
            process_set = self.process_set if self.process_set is not None else dist.bn_group(self.group_size)
        if not use_batch_stats or process_set is None:
            # Eval with running stats, a group of one rank, or a single process: plain BN.
            return self._local_bn(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        fused = self.impl == "fused"
        if fused and x.device.type == "cpu" and isinstance(FUSED, FusedKernels):
            raise RuntimeError("SyncBatchNorm impl='fused' (model.syncbn_impl=fused) needs CUDA tensors: torch's "
                               "fused BatchNorm kernels have no CPU implementation; use model.syncbn_impl=plain")
        with torch.no_grad():
            # No host synchronisation here (a GPU would stall once per layer): the count stays a
            # tensor; the engine reads every layer's (group_counts) with the losses, once per pass.
            (mean, var, count), count64 = self._group_stats(x, process_set, fused)
            self.last_group_count = count
            if self.training and self.track_running_stats:
                m = self._momentum()
                unbiased = var * (count / (count - 1).clamp(min=1.0))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        if fused:
            return _FusedSyncBNFunction.apply(x, self.weight, self.bias, mean, torch.rsqrt(var + self.eps),
                                              self.eps, count64, process_set, self._name)
        return _SyncBNFunction.apply(x, self.weight, self.bias, mean, var, self.eps, count.clamp(min=1.0),
                                     process_set, self._name)

    def _local_bn(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training or not self.track_running_stats,
                            self._momentum() if self.training and self.track_running_stats else 0.0, self.eps)

    def _group_stats(self, x: torch.Tensor, process_set, fused: bool):
        """Group mean and biased variance (fp32) and the group's count, by one allreduce of
        ``[Σx, Σx², n]`` in fp64, where the final ``E[x²] − E[x]²`` is exact enough.

        plain: each rank sums ``d = x − K`` and ``d²`` in fp32 with ``K`` one of its own values
        per channel (so |d| ~ std: no cancellation), then expresses them as ``Σx`` and ``Σx²``.
        fused: the kernel's Welford mean and ``1/sqrt(var + eps)``, turned back into the sums.
        """
        c = x.shape[1]
        n = x.numel() // c if x.numel() else 0
        if n and fused:
            mean, invstd = FUSED.stats(x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(),
                                       self.eps)
            stats = local_sums(n, mean, (invstd.double().pow(-2) - self.eps).clamp(min=0.0))
        elif n:
            shift = x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].float()  # x[0, :, 0, 0]
            d = x.detach().float() - _bcast(shift, x)
            s1 = d.sum(_reduce_dims(x)).double()
            s2 = d.square_().sum(_reduce_dims(x)).double()
            k = shift.double()
            stats = torch.cat([n * k + s1, s2 + 2 * k * s1 + n * k * k,
                               torch.full((1,), float(n), dtype=torch.float64, device=x.device)])  # no host copy
        else:  # an empty rank: zeros, and it still joins the collective
            stats = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        stats = dist.allreduce(stats, op=dist.Sum, name=self._name + ".fwd", process_set=process_set)
        return group_moments(stats, c), stats[-1]


def group_counts(model: nn.Module) -> tuple[list[str], torch.Tensor | None]:
    """Every SyncBatchNorm's group count (values per channel) of the last training forward,
    stacked on the device without a host read, with the layers' names; clears them. The engine
    reads them together with the losses in its one device-to-host read per pass."""
    layers = [(n or m._name, m) for n, m in model.named_modules()
              if isinstance(m, SyncBatchNorm) and m.last_group_count is not None]
    if not layers:
        return [], None
    counts = torch.stack([m.last_group_count for _, m in layers])
    for _, m in layers:
        m.last_group_count = None
    return [n for n, _ in layers], counts


def count_problem(names: list[str], counts: list[float]) -> str | None:
    """Why a training forward was invalid, or None: a SyncBatchNorm whose whole BN group held at
    most one value per channel (its variance is meaningless)."""
    for name, c in zip(names, counts):
        if c <= 1:
            return (f"SyncBatchNorm {name}: expected more than 1 value per channel in the BN group "
                    f"when training, got {int(c)} (rank {dist.rank()})")
    return None


def check_group_counts(model: nn.Module) -> str | None:
    """:func:`count_problem` of the last training forward (one host read; for tools and tests)."""
    names, counts = group_counts(model)
    return count_problem(names, counts.tolist()) if names else None


def average_running_stats(model: nn.Module, name: str = "bn_running_stats") -> int:
    """Make every rank hold the same BN running statistics: the mean over all ranks.

    Each BN group keeps its own exponential averages (its own batches); evaluation and
    checkpoints need one model. All running means and variances travel in ONE fp64 allreduce
    (the average of the groups' averages: with equal groups, the mean of the groups' EMAs of
    the mean, and of the variance — not the variance of the pooled batch). Collective: call
    on every rank. Returns the number of layers averaged.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if dist.size() == 1 or not bns:
        return len(bns)
    bufs = [b for m in bns for b in (m.running_mean, m.running_var)]
    flat = torch.cat([b.detach().double().flatten() for b in bufs])
    flat = dist.allreduce(flat, op=dist.Average, name=name)
    with torch.no_grad():
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))
    return len(bns)


def convert_sync_batchnorm(module: nn.Module, group_size: int | None = None,
                           convert_frozen: bool = False, impl: str = "plain") -> nn.Module:
    """Replace every ``BatchNorm2d`` (and, with ``convert_frozen``, torchvision's
    ``FrozenBatchNorm2d``, made trainable) by :class:`SyncBatchNorm`, keeping
    weights, buffers, device, dtype and train/eval mode. Returns the new module."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    out = module
    if isinstance(module, nn.BatchNorm2d):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group_size, impl=impl)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
                out.weight.requires_grad_(module.weight.requires_grad)
                out.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.to(device=module.running_mean.device if module.running_mean is not None else None)
        out.train(module.training)
    elif convert_frozen and isinstance(module, FrozenBatchNorm2d):
        out = SyncBatchNorm(module.weight.numel(), module.eps, group_size=group_size, impl=impl)
        with torch.no_grad():
            out.weight.copy_(module.weight)
            out.bias.copy_(module.bias)
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
        out.to(module.weight.device)
        out.train(module.training)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, group_size, convert_frozen, impl)
        if new is not child:
            out.add_module(name, new)
    return out
