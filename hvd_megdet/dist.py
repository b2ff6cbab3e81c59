"""Rank queries and collectives: every Horovod call made while a job runs goes through here.

Starting Horovod (``hvd.init``, the BN groups' process sets, the restart) is ``launch.py``'s;
these two are the only modules that import horovod. Every helper also works in a plain single
process (size 1), initialised or not, so library code and unit tests call them without a launcher.

Every collective is made through :func:`blocking`, which records its name while this rank waits
in it: the watchdog (watchdog.py) then says which collective a hung rank waits in. Every rank must
call the same collectives in the same order: the name of each is the contract, and the error
message of a hang.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

import torch

import horovod.torch as hvd

Sum = hvd.Sum
Average = hvd.Average


class DistError(RuntimeError):
    """A distributed set-up error, raised identically on every rank before any collective."""


# --- which collective this rank waits in (for the watchdog) -----------------

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


# --- rank queries -----------------------------------------------------------

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


# --- BN groups (registered by launch.init) ----------------------------------

# group_size -> this rank's ProcessSet (None means "no communication": k == 1).
_bn_sets: dict[int, Any] = {}


def register_bn_group(group_size: int, process_set) -> None:
    """Called by ``launch.init`` once the group's process set exists on this rank."""
    _bn_sets[group_size] = process_set


def registered_bn_groups() -> list[int]:
    return sorted(_bn_sets)


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
            f"hvd_megdet.launch.init(bn_group_size={k}) (registered: {sorted(_bn_sets)})")
    return _bn_sets[k]


def global_set():
    """Horovod's set of all ranks: a collective given it explicitly runs even on one rank (tools
    that measure the group path of SyncBN on one GPU)."""
    return hvd.global_process_set


def bn_group_ranks(group_size: int | None) -> list[int]:
    """The ranks in this rank's BN group (contiguous block)."""
    k = size() if group_size is None else group_size
    start = rank() // k * k
    return list(range(start, start + k))


# --- collectives (no-ops in a single process) -------------------------------

def allreduce(tensor: torch.Tensor, op=Sum, name: str | None = None, process_set=None) -> torch.Tensor:
    """Differentiable allreduce (returns a new tensor). A no-op copy in a single process, unless
    ``process_set`` is given explicitly."""
    if size() == 1 and process_set is None:
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


def barrier(name: str = "barrier") -> None:
    if size() > 1:
        blocking(name, hvd.barrier)


def average_scalars(values: dict[str, float], name: str = "average_scalars") -> dict[str, float]:
    """Mean of a dict of scalars over all ranks (for logging). Same keys on every rank."""
    if size() == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = blocking(name, hvd.allreduce, t, op=hvd.Average, name=name)
    return dict(zip(keys, t.tolist()))


def broadcast_parameters(state_dict, root: int = 0, name: str = "broadcast_parameters") -> None:
    if size() > 1:
        blocking(name, hvd.broadcast_parameters, state_dict, root_rank=root)


def broadcast_optimizer_state(optimizer, root: int = 0, name: str = "broadcast_optimizer_state") -> None:
    if size() > 1:
        blocking(name, hvd.broadcast_optimizer_state, optimizer, root_rank=root)


def root_decides(decide: Callable[[], Any], name: str, error: type[Exception],
                 catch: tuple[type[Exception], ...] = (Exception,),
                 describe: Callable[[Exception], str] = str) -> Any:
    """Rank 0 alone runs ``decide()``; its result reaches every rank, or, when it raised one of
    ``catch``, every rank raises the same ``error(describe(exception))``. One broadcast: a bad
    file read by rank 0 fails the whole job alike instead of one rank while the others hang."""
    verdict = None
    if is_main():
        try:
            verdict = ("ok", decide())
        except catch as e:  # whatever it is, every rank must hear it, not hang
            verdict = ("error", describe(e))
    kind, value = broadcast_object(verdict, name=name)
    if kind == "error":
        raise error(value)
    return value


def distributed_optimizer(optimizer, named_parameters, fp16_compression: bool = False,
                          backward_passes_per_step: int = 1):
    """Wrap ``optimizer`` in ``hvd.DistributedOptimizer`` (gradients averaged by allreduce)."""
    return hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters,
        compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step, op=hvd.Average)
