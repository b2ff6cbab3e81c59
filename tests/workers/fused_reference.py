"""Reference implementations of torch's four fused BatchNorm kernels, written from their definitions
(CUDA only in torch: no CPU kernel). Swapped into ``hvd_megdet.sync_bn.FUSED`` by the SyncBN checks so
that the fused path's control flow (shapes, counts, empty ranks, both collectives, autograd) runs on
CPU ranks; the kernels themselves are validated on a GPU by scripts/gpu_check.sh (step syncbn)."""
import torch


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _b(v, x):
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class ReferenceKernels:
    calls = {"stats": 0, "elemt": 0, "backward_reduce": 0, "backward_elemt": 0}

    @classmethod
    def stats(cls, x, eps):
        """(mean, 1/sqrt(biased var + eps)), fp32, per channel."""
        cls.calls["stats"] += 1
        var, mean = torch.var_mean(x.double(), _dims(x), correction=0)
        return mean.float(), (var + eps).rsqrt().float()

    @classmethod
    def elemt(cls, x, weight, bias, mean, invstd, eps):
        cls.calls["elemt"] += 1
        y = (x.double() - _b(mean.double(), x)) * _b(invstd.double(), x)
        if weight is not None:
            y = y * _b(weight.double(), x) + _b(bias.double(), x)
        return y.to(x.dtype)

    @classmethod
    def backward_reduce(cls, dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        """(Σdy, Σdy·(x − mean), grad_weight = Σdy·x̂, grad_bias = Σdy), fp32 sums."""
        cls.calls["backward_reduce"] += 1
        d, xmu = dy.double(), x.double() - _b(mean.double(), x)
        sum_dy, sum_dy_xmu = d.sum(_dims(x)), (d * xmu).sum(_dims(x))
        gw = (sum_dy_xmu * invstd.double()).to(weight.dtype) if weight_g else None
        gb = sum_dy.to(weight.dtype) if bias_g else None
        return (sum_dy.float() if input_g else None), (sum_dy_xmu.float() if input_g else None), gw, gb

    @classmethod
    def backward_elemt(cls, dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        """dx = (dy − Σdy/N − (x − mean)·invstd²·Σdy(x − mean)/N)·invstd·w, N = Σcount."""
        cls.calls["backward_elemt"] += 1
        n = count.double().sum()
        m, s = _b(mean.double(), x), _b(invstd.double(), x)
        scale = s * (_b(weight.double(), x) if weight is not None else 1.0)
        dx = (dy.double() - _b(sum_dy.double(), x) / n - (x.double() - m) * s * s * _b(sum_dy_xmu.double(), x) / n)
        return (dx * scale).to(x.dtype)
