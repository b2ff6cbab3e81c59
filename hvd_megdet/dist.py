"""Everything distributed goes through here: the only module importing horovod and mpi4py.

Rank and size come from ``hvd.init()`` only. Every helper also works in a plain
single process (size 1), initialised or not, so library code and unit tests can
call them without a launcher.

BN groups (MegDet's "BN size"): contiguous blocks of ``k`` ranks, registered as
Horovod process sets at ``init(bn_group_size=k)``: static sets under the Gloo controller
(given to ``hvd.init``, which needs the world size first: Horovod starts without them, tells
the size, and restarts with the groups), Horovod's dynamic sets under MPI (whichever was
faster here, see ``_dynamic``). A static restart under MPI has mpi4py start MPI and hands
Horovod its communicator: a Horovod that started MPI itself finalises it at shutdown, and
MPI cannot start twice.
"""
from __future__ import annotations

import atexit
import os
import pickle
import random
import socket
import sys
from typing import Any, Iterable

import numpy as np
import torch

import horovod
import horovod.torch as hvd

from hvd_megdet.errors import UserError

Sum = hvd.Sum
Average = hvd.Average

# group_size -> this rank's ProcessSet (None means "no communication": k == 1).
_bn_sets: dict[int, Any] = {}
# The blocking collective this rank is inside, if any (the watchdog reports it on a hang).
_in_collective: list[str] = []


def current_collective() -> str | None:
    return _in_collective[-1] if _in_collective else None


def blocking(what: str, fn, *args, **kwargs):
    """Call ``fn``, recorded as waiting in collective ``what`` (for the watchdog's report)."""
    _in_collective.append(what)
    try:
        return fn(*args, **kwargs)
    finally:
        _in_collective.pop()


class DistError(RuntimeError):
    """A distributed set-up error, raised identically on every rank before any collective."""


_comm: list[Any] = []  # mpi4py's COMM_WORLD when MPI runs the job (kept for restarts)


def _dynamic() -> bool:
    """Whether BN groups use Horovod's dynamic process sets rather than a restart with static ones.

    Measured on 2-4 CPU ranks (scripts/benchmark_process_sets.py, README "Benchmarks"): under Gloo
    static sets are faster (dynamic ones make Horovod's background loop coordinate process sets on
    every cycle: 4-5x slower SyncBN-like traffic at 4 ranks); under MPI the static path, which needs
    MPI started by mpi4py so that Horovod's shutdown does not finalise it, was 1.3-1.8x SLOWER than
    Horovod starting MPI itself with dynamic sets. So: static under Gloo, dynamic under MPI (also
    where mpi4py cannot start MPI: HOROVOD_MPI_THREADS_DISABLE=1, no mpi4py).
    HVD_MEGDET_PROCESS_SETS=static|dynamic overrides (the benchmark compares the two)."""
    forced = os.environ.get("HVD_MEGDET_PROCESS_SETS")
    if forced in ("static", "dynamic"):
        return forced == "dynamic" or (_mpi_controller() and not _has_mpi4py())
    return _mpi_controller()


def _mpi_controller() -> bool:
    """Whether Horovod will run on MPI (not the Gloo controller horovodrun --gloo asks for)."""
    gloo = os.environ.get("HOROVOD_CONTROLLER") == "gloo" or bool(os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"))
    return not gloo and hvd.mpi_built()


def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
        return True
    except ImportError:
        return False


def _start(process_sets: list) -> None:
    """hvd.init with these static process sets; MPI jobs through an mpi4py communicator."""
    if _dynamic():
        hvd.init(process_sets="dynamic")
        return
    if not _comm and _mpi_controller():
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:  # mpi4py starts MPI (and finalises it at exit)
            mpi4py.rc.thread_level = "multiple"  # what Horovod's background thread needs
        from mpi4py import MPI
        if not MPI.Is_initialized():  # imported earlier without starting MPI (mpi_library_version)
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
            atexit.register(MPI.Finalize)  # runs after Horovod's own exit handler (registered later)
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise DistError(f"MPI gives thread level {MPI.Query_thread()}, Horovod needs MPI_THREAD_MULTIPLE "
                            f"(rank {MPI.COMM_WORLD.Get_rank()} of the MPI job): use an MPI built with threads, "
                            f"or HOROVOD_MPI_THREADS_DISABLE=1")
        _comm.append(MPI.COMM_WORLD)
    hvd.init(comm=_comm[0] if _comm else None, process_sets=process_sets or None)


def init(bn_group_size: int | Iterable[int] | None = None, timeline: str = "") -> None:
    """Initialise Horovod and register the process sets of the BN groups.

    ``bn_group_size``: one size or several (e.g. ``[2, 4]``); each must divide
    ``size()``. Idempotent for the same sizes; new group sizes restart Horovod with every
    group registered (collective: call it on every rank, before any other collective of the
    job is in flight). ``timeline``: a file for Horovod's timeline (HOROVOD_TIMELINE, read
    inside ``hvd.init``; rank 0 writes it).
    """
    if not hvd.is_initialized():
        # SyncBN makes 2 small synchronous allreduces per BN layer per iteration, each waiting for
        # Horovod's background cycle: 0.1 ms instead of 1 ms (benchmarks/syncbn.json: ResNet-50 BN
        # layers 228 -> 74 ms per iteration under MPI; shapes_tiny 3.26 -> 3.51 it/s).
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.1")
        if not torch.cuda.is_available():
            # CPU ranks share cores with Horovod's background thread: Open MPI's default
            # busy-wait steals them from compute (measured: 2.1 -> 2.7 it/s for shapes_tiny
            # on 2 ranks / 2 cores). Read by MPI_Init inside hvd.init; the user's value wins.
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        if timeline:
            os.environ["HOROVOD_TIMELINE"] = timeline
        _start([])
    sizes = [] if bn_group_size is None else (
        [bn_group_size] if isinstance(bn_group_size, int) else list(bn_group_size))
    world = hvd.size()
    for k in sizes:  # validate all sizes first: the same error on every rank, no collective yet
        if not isinstance(k, int) or k < 1 or world % k != 0:
            raise DistError(f"BN group size {k!r} does not divide the world size {world} "
                            f"(rank {hvd.rank()}): choose a divisor of {world}")
    for k in sizes:
        if k == 1:
            _bn_sets[k] = None
        elif k == world:
            _bn_sets[k] = hvd.global_process_set
    groups = sorted({k for k in sizes if 1 < k < world} | {k for k, ps in _bn_sets.items() if 1 < k < world})
    if not groups or all(k in _bn_sets for k in groups):
        return
    if _dynamic():  # add_process_set is collective: every rank adds every block, in the same order
        for k in (k for k in groups if k not in _bn_sets):
            blocks = [hvd.add_process_set(list(range(start, start + k))) for start in range(0, world, k)]
            _bn_sets[k] = next(ps for ps in blocks if ps.included())
        return
    # Restart with every group size's blocks as static sets (rank and size stay Horovod's). A
    # shutdown stops every rank's Horovod: all must agree on the groups first.
    agreed = allgather_object(groups, name="bn_groups")
    if any(g != groups for g in agreed):
        raise DistError(f"ranks ask for different BN groups: {dict(enumerate(agreed))} (rank {hvd.rank()})")
    blocks = {k: [hvd.ProcessSet(list(range(start, start + k))) for start in range(0, world, k)] for k in groups}
    hvd.shutdown()
    # Gloo's rendezvous for the restart waits this long for a late rank (Horovod's default, 30 s,
    # aborts the others without a word): generous, since ranks got here together.
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "300")
    _start([ps for k in groups for ps in blocks[k]])
    if hvd.size() != world:
        raise DistError(f"Horovod restarted with {hvd.size()} ranks instead of {world} (rank {hvd.rank()})")
    for k in groups:
        _bn_sets[k] = next(ps for ps in blocks[k] if ps.included())


def rank() -> int:
    return hvd.rank() if hvd.is_initialized() else 0


def size() -> int:
    return hvd.size() if hvd.is_initialized() else 1


def local_rank() -> int:
    return hvd.local_rank() if hvd.is_initialized() else 0


def local_size() -> int:
    return hvd.local_size() if hvd.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def controller() -> str:
    """Which Horovod controller runs this job: 'mpi', 'gloo' or 'none' (not initialised)."""
    if not hvd.is_initialized():
        return "none"
    return "mpi" if hvd.mpi_enabled() else ("gloo" if hvd.gloo_enabled() else "unknown")


def bn_group(group_size: int | None):
    """The process set this rank uses for a BN group of ``group_size`` ranks.

    Returns ``None`` when no communication is needed (group of 1, or a single
    process). ``group_size=None`` means all ranks.
    """
    world = size()
    k = world if group_size is None else group_size
    if k == 1 or world == 1:
        if world % k != 0:
            raise DistError(f"BN group size {k} does not divide the world size {world}")
        return None
    if k == world:
        return hvd.global_process_set
    if k not in _bn_sets:
        raise DistError(
            f"BN group size {k} was not registered on rank {rank()}: call "
            f"hvd_megdet.dist.init(bn_group_size={k}) (registered: {sorted(_bn_sets)})")
    return _bn_sets[k]


def bn_group_ranks(group_size: int | None) -> list[int]:
    """The ranks in this rank's BN group (contiguous block)."""
    world = size()
    k = world if group_size is None else group_size
    start = rank() // k * k
    return list(range(start, start + k))


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be had on this rank (no usable CUDA, too few GPUs)."""


_device: list[torch.device] = []  # the device chosen by select_device()


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
        if gpus >= local_size() or gpus == 1:  # one GPU each, or this rank's own (per-task binding)
            dev = torch.device("cuda", local_rank() if gpus >= local_size() else 0)
            # Before any CUDA work: otherwise every rank's first allocation, NCCL communicator and
            # default-device RNG land on cuda:0.
            torch.cuda.set_device(dev)
        else:
            problem = (f"{local_size()} ranks on {host} but {gpus} visible GPUs (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank per GPU "
                       f"(e.g. srun --ntasks-per-node={gpus}, horovodrun -H {host}:{gpus})")
    mine = (host, _gpu_id(dev) if dev.type == "cuda" else None, problem)
    report = device_problems(allgather_object(mine, name="devices"), kind)
    if report:
        raise DeviceError(f"train.device={kind}: {report} (this is rank {rank()})")
    _device[:] = [dev]
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


def device() -> torch.device:
    """The device chosen by :func:`select_device`; before that, what ``auto`` would pick from this
    rank's facts alone (no collective: select_device's agreement must not hide in a getter)."""
    if _device:
        return _device[0]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def describe_device(dev: torch.device) -> str:
    """One log line's worth: 'cuda:3 (NVIDIA H100 80GB HBM3, 79.1 GiB, driver CUDA 12.4)' or 'cpu'."""
    if dev.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads; CUDA {'not ' if not torch.cuda.is_available() else ''}available)"
    p = torch.cuda.get_device_properties(dev)
    return (f"{dev} ({p.name}, {p.total_memory / 2**30:.1f} GiB, torch CUDA {torch.version.cuda}, "
            f"driver CUDA {cuda_facts()['driver_cuda']}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def seed_all(seed: int, per_rank: bool = True, salt: int = 0) -> int:
    """Seed python, numpy and torch (all devices); ``seed + rank`` when ``per_rank``, mixed with
    ``salt`` when given (e.g. images seen, to re-derive streams on resume). Returns the seed used."""
    s = seed + (rank() if per_rank else 0)
    if salt:
        s = (s * 1_000_003 + salt) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


# --- collectives (no-ops in a single process) -----------------------------

def allreduce(tensor: torch.Tensor, op=Sum, name: str | None = None, process_set=None) -> torch.Tensor:
    """Differentiable allreduce (returns a new tensor)."""
    if size() == 1:
        return tensor.clone()
    kw = {"process_set": process_set} if process_set is not None else {}
    return blocking(name or "allreduce", hvd.allreduce, tensor, op=op, name=name, **kw)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Every rank gets the list of every rank's ``obj`` (picklable), ordered by rank."""
    if size() == 1:
        return [obj]
    return blocking(name or "allgather_object", hvd.allgather_object, obj, name=name)


def gather_object(obj: Any, root: int = 0, name: str | None = None) -> list[Any] | None:
    """``root`` gets the list of every rank's ``obj`` (picklable), ordered by rank; the others get
    None. Horovod has no gather: one ``alltoall`` of the pickled bytes in which every rank sends
    all its bytes to ``root`` and nothing elsewhere, so only root ever holds everyone's payload
    (``allgather_object`` would put it on all 128 ranks). Horovod exchanges the per-rank sizes
    inside the alltoall. MPI counts are C ints: the total at root must stay under 2 GiB."""
    if size() == 1:
        return [obj]
    name = name or "gather_object"
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    total = int(allreduce(torch.tensor([payload.numel()], dtype=torch.float64), op=Sum, name=name + ".size"))
    if total >= 2**31:  # Horovod's MPI displacements are C ints: fail on every rank, not just root
        raise DistError(f"gather_object {name}: {total / 2**30:.1f} GiB in all, over the 2 GiB Horovod can gather")
    splits = torch.zeros(size(), dtype=torch.int32)
    splits[root] = payload.numel()
    received, counts = blocking(name, hvd.alltoall, payload, splits=splits, name=name)
    if rank() != root:
        return None
    parts, start = [], 0
    for n in counts.tolist():
        parts.append(pickle.loads(received[start:start + n].numpy().tobytes()))
        start += n
    return parts


def broadcast_object(obj: Any, root: int = 0, name: str | None = None) -> Any:
    if size() == 1:
        return obj
    return blocking(name or "broadcast_object", hvd.broadcast_object, obj, root_rank=root, name=name)


def barrier() -> None:
    if size() > 1:
        blocking("barrier", hvd.barrier)


def average_scalars(values: dict[str, float], name: str = "average_scalars") -> dict[str, float]:
    """Mean of a dict of scalars over all ranks (for logging). Same keys on every rank."""
    if size() == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = hvd.allreduce(t, op=hvd.Average, name=name)
    return dict(zip(keys, t.tolist()))


def broadcast_parameters(state_dict, root: int = 0) -> None:
    if size() > 1:
        hvd.broadcast_parameters(state_dict, root_rank=root)


def broadcast_optimizer_state(optimizer, root: int = 0) -> None:
    if size() > 1:
        hvd.broadcast_optimizer_state(optimizer, root_rank=root)


def distributed_optimizer(optimizer, named_parameters, fp16_compression: bool = False,
                          backward_passes_per_step: int = 1):
    """Wrap ``optimizer`` in ``hvd.DistributedOptimizer`` (gradients averaged by allreduce)."""
    return hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters,
        compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step, op=hvd.Average)


def environment() -> dict[str, Any]:
    """Facts for the head of each rank's log."""
    import torchvision
    return {
        "rank": rank(), "size": size(), "local_rank": local_rank(), "local_size": local_size(),
        "host": socket.gethostname(), "pid": os.getpid(),
        "device": str(_device[0]) if _device else "(chosen from train.device)",
        "controller": controller(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "horovod": horovod.__version__, "mpi": mpi_library_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def mpi_library_version() -> str | None:
    """The MPI library's version string, without initialising MPI (allowed before MPI_Init)."""
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:  # importing it must not initialise MPI: _start does that
            mpi4py.rc.initialize = False
        from mpi4py import MPI
        return MPI.Get_library_version().splitlines()[0].strip()
    except Exception:  # mpi4py missing or built against another MPI: not fatal for a log line
        return None
