"""This rank's device (``train.device`` auto | cuda | cpu), agreed by every rank, and what decides
whether CUDA works here, for error messages and logs."""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from hvd_megdet import dist
from hvd_megdet.errors import UserError


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be had on this rank (no usable CUDA, too few GPUs)."""


def cuda_facts() -> dict[str, Any]:
    """What decides whether CUDA works here, for error messages and logs; never raises."""
    import ctypes
    facts: dict[str, Any] = {"torch_cuda": torch.version.cuda,
                             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}
    try:  # the driver's own version, even where torch cannot use it (too old for torch's CUDA)
        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        facts["driver_cuda"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except OSError:
        facts["driver_cuda"] = "none (libcuda.so.1 not found: no NVIDIA driver)"
    try:
        torch.cuda.init()
        facts["gpus"] = torch.cuda.device_count()
    except Exception as e:  # noqa: BLE001 - torch's own reason is the message we want
        facts["gpus"], facts["error"] = 0, str(e).strip().splitlines()[0]
    return facts


def select_device(kind: str = "auto") -> torch.device:
    """This rank's device for ``train.device`` (auto | cuda | cpu); collective, call it on every
    rank before any CUDA work.

    ``cuda`` without usable CUDA, fewer visible GPUs on a host than ranks there (unless each rank
    sees exactly one: SLURM's per-task GPU binding), two ranks on one GPU (NCCL would fail later
    with "Duplicate GPU detected", which looks like a node fault), or ``auto`` finding CUDA on some
    ranks only: a DeviceError on EVERY rank, naming the ranks and hosts concerned, after one
    allgather of each rank's (host, GPU, problem)."""
    if kind not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"train.device={kind!r}: must be auto, cuda or cpu")
    use_cuda = kind != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() > 0
    host = socket.gethostname()
    dev, problem = torch.device("cpu"), None
    if kind == "cuda" and not use_cuda:
        f = cuda_facts()
        problem = (f"CUDA is not usable: {f.get('error', 'no GPU visible')}; torch {torch.__version__} is built "
                   f"for CUDA {f['torch_cuda']}, the driver supports CUDA {f['driver_cuda']}, "
                   f"CUDA_VISIBLE_DEVICES={f['CUDA_VISIBLE_DEVICES']} (train.device=cpu trains on the CPU on purpose)")
    elif use_cuda:
        gpus = torch.cuda.device_count()
        if gpus >= dist.local_size() or gpus == 1:  # one GPU each, or this rank's own (per-task binding)
            dev = torch.device("cuda", dist.local_rank() if gpus >= dist.local_size() else 0)
            # Before any CUDA work: otherwise every rank's first allocation, NCCL communicator and
            # default-device RNG land on cuda:0.
            torch.cuda.set_device(dev)
        else:
            problem = (f"{dist.local_size()} ranks on {host} but {gpus} visible GPUs (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank per GPU "
                       f"(e.g. srun --ntasks-per-node={gpus}, horovodrun -H {host}:{gpus})")
    mine = (host, _gpu_id(dev) if dev.type == "cuda" else None, problem)
    report = device_problems(dist.allgather_object(mine, name="devices"), kind)
    if report:
        raise DeviceError(f"train.device={kind}: {report} (this is rank {dist.rank()})")
    return dev


def _gpu_id(dev: torch.device) -> str:
    """The GPU's UUID (two ranks with the same one share a GPU), else the device name."""
    try:
        return str(torch.cuda.get_device_properties(dev).uuid)
    except Exception:  # noqa: BLE001 - an older torch without uuid
        return str(dev)


def device_problems(per_rank: list[tuple[str, str | None, str | None]], kind: str) -> str | None:
    """What is wrong with every rank's (host, GPU id or None for the CPU, problem), or None."""
    bad = [(r, h, why) for r, (h, _, why) in enumerate(per_rank) if why]
    if bad:
        r, h, why = bad[0]
        more = f"; {len(bad) - 1} more rank(s): {[b[0] for b in bad[1:]][:16]}" if len(bad) > 1 else ""
        return f"rank {r} on {h}: {why}{more}"
    users: dict[tuple[str, str], list[int]] = {}
    for r, (h, gpu, _) in enumerate(per_rank):
        if gpu is not None:
            users.setdefault((h, gpu), []).append(r)
    shared = [(h, gpu, rs) for (h, gpu), rs in users.items() if len(rs) > 1]
    if shared:
        h, gpu, rs = shared[0]
        return (f"ranks {rs} on {h} share one GPU ({gpu}): give each rank its own GPU "
                f"(one task per GPU; CUDA_VISIBLE_DEVICES)")
    on_cpu = [r for r, (_, gpu, _) in enumerate(per_rank) if gpu is None]
    if on_cpu and len(on_cpu) < len(per_rank):
        hosts = sorted({per_rank[r][0] for r in on_cpu})
        return (f"ranks {on_cpu[:16]} on {hosts} have no usable CUDA while the others use a GPU "
                f"(train.device={kind}): a node's GPU or driver is broken; set train.device=cuda to fail there")
    return None


def describe_device(dev: torch.device) -> str:
    """One log line's worth: 'cuda:3 (NVIDIA H100 80GB HBM3, 79.1 GiB, driver CUDA 12.4)' or 'cpu'."""
    if dev.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads; CUDA {'not ' if not torch.cuda.is_available() else ''}available)"
    p = torch.cuda.get_device_properties(dev)
    return (f"{dev} ({p.name}, {p.total_memory / 2**30:.1f} GiB, torch CUDA {torch.version.cuda}, "
            f"driver CUDA {cuda_facts()['driver_cuda']}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
