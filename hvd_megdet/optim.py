"""SGD with per-group weight decay, wrapped in Horovod's DistributedOptimizer; clipping done right."""
from __future__ import annotations

import torch
from torch import nn

from hvd_megdet import dist
from hvd_megdet.config import SolverConfig
from hvd_megdet.model import NORM_TYPES


def param_groups(model: nn.Module, solver: SolverConfig) -> list[dict]:
    """Two groups: norm-layer parameters (``weight_decay_norm``) and the rest (``weight_decay``)."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    norm, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (norm if id(p) in norm_ids else other).append(p)
    return [{"params": other, "weight_decay": solver.weight_decay},
            {"params": norm, "weight_decay": solver.weight_decay_norm}]


def build_optimizer(model: nn.Module, solver: SolverConfig, lr: float):
    """``hvd.DistributedOptimizer`` over SGD: gradients averaged over all ranks by allreduce."""
    sgd = torch.optim.SGD(param_groups(model, solver), lr=lr, momentum=solver.momentum)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dist.distributed_optimizer(sgd, named, fp16_compression=solver.fp16_allreduce,
                                      backward_passes_per_step=solver.backward_passes_per_step)


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def step(optimizer, model: nn.Module, clip_grad_norm: float, scaler=None) -> torch.Tensor | None:
    """Optimizer step. Clipping and AMP unscaling must see averaged gradients: wait for
    Horovod's allreduce (``synchronize``), then step without a second one
    (``skip_synchronize``). Returns the gradient norm when clipping, as a tensor on the device
    (reading it would stall a GPU every iteration)."""
    if clip_grad_norm <= 0 and scaler is None:
        optimizer.step()
        return None
    optimizer.synchronize()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = None
    if clip_grad_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    with optimizer.skip_synchronize():
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    return norm
