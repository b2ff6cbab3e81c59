"""Starting Horovod: ``hvd.init`` under MPI or Gloo (mpi4py where MPI runs the job), the BN groups'
process sets, the restart that static sets need, and the runtime facts at the head of every log.

BN groups (MegDet's "BN size"): contiguous blocks of ``k`` ranks, registered as Horovod process
sets at ``init(bn_group_size=k)``: static sets under the Gloo controller (given to ``hvd.init``,
which needs the world size first: Horovod starts without them, tells the size, and restarts with
the groups), Horovod's dynamic sets under MPI (whichever was faster here, see ``_dynamic``). A
static restart under MPI has mpi4py start MPI and hands Horovod its communicator: a Horovod that
started MPI itself finalises it at shutdown, and MPI cannot start twice.
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
from typing import Any, Iterable

import torch

import horovod
import horovod.torch as hvd

from hvd_megdet import dist
from hvd_megdet.dist import DistError
from hvd_megdet.errors import UserError

class LaunchSettingError(UserError, DistError):
    """A launch setting (an environment variable) that cannot work: the same error on every rank,
    before any collective; a user error (exit 2: a restart would fail the same way)."""


_comm: list[Any] = []  # mpi4py's COMM_WORLD when MPI runs the job (kept for restarts)


def _dynamic() -> bool:
    """Whether BN groups use Horovod's dynamic process sets rather than a restart with static ones.

    Measured on 2-4 CPU ranks (scripts/experiments/benchmark_process_sets.py, README "Benchmarks"):
    under Gloo static sets are faster (dynamic ones make Horovod's background loop coordinate
    process sets on every cycle: 4-5x slower SyncBN-like traffic at 4 ranks); under MPI the static
    path, which needs MPI started by mpi4py so that Horovod's shutdown does not finalise it, was
    1.3-1.8x SLOWER than Horovod starting MPI itself with dynamic sets. So: static under Gloo,
    dynamic under MPI (also where mpi4py cannot start MPI: HOROVOD_MPI_THREADS_DISABLE=1, no
    mpi4py). HVD_MEGDET_PROCESS_SETS=static|dynamic overrides (the benchmark compares the two)."""
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
        if torch.cuda.is_available():
            # A CUDA allreduce then completes in stream order (the caller's stream waits on Horovod's
            # event) instead of the host waiting with cudaEventSynchronize: without it every SyncBN
            # collective (2 per BN layer) drains the GPU's queue. Correct while all the work is on
            # the default stream, as here (README "GPU performance"). The user's value wins.
            os.environ.setdefault("HOROVOD_ENABLE_ASYNC_COMPLETION", "1")
        else:
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
    if any(1 < k < world for k in sizes):
        check_nccl_streams()
    known = dist.registered_bn_groups()
    for k in sizes:
        if k == 1:
            dist.register_bn_group(k, None)
        elif k == world:
            dist.register_bn_group(k, hvd.global_process_set)
    groups = sorted({k for k in sizes + known if 1 < k < world})
    if all(k in known for k in groups):
        return
    if _dynamic():  # add_process_set is collective: every rank adds every block, in the same order
        for k in (k for k in groups if k not in known):
            blocks = [hvd.add_process_set(list(range(start, start + k))) for start in range(0, world, k)]
            dist.register_bn_group(k, next(ps for ps in blocks if ps.included()))
        return
    # Restart with every group size's blocks as static sets (rank and size stay Horovod's). A
    # shutdown stops every rank's Horovod: all must agree on the groups first.
    agreed = dist.allgather_object(groups, name="bn_groups")
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
        dist.register_bn_group(k, next(ps for ps in blocks[k] if ps.included()))


def check_nccl_streams() -> None:
    """Refuse ``HOROVOD_NUM_NCCL_STREAMS`` > 1 with BN groups: Horovod 0.28.1 picks a GPU op's NCCL
    communicator by ONE per-process counter that advances on every NCCL op the rank runs
    (common/ops/gpu_operations.cc:139-141, nccl_operations.cc:96-99), so ranks of different BN groups
    drift apart and pick different communicators for the same global collective: a hang."""
    raw = os.environ.get("HOROVOD_NUM_NCCL_STREAMS", "").strip()
    try:
        streams = int(raw) if raw else 1
    except ValueError:
        streams = 1  # Horovod itself would fail on it; not this check's business
    if streams > 1:
        raise LaunchSettingError(f"HOROVOD_NUM_NCCL_STREAMS={raw} (horovodrun --num-nccl-streams) with BN groups smaller "
                        f"than the world hangs Horovod 0.28.1's NCCL ops (ranks of different groups pick different "
                        f"communicators for the same collective; README \"GPU performance\"): unset it or set it to "
                        f"1 (rank {hvd.rank()})")


def controller() -> str:
    """Which Horovod controller runs this job: 'mpi', 'gloo' or 'none' (not initialised)."""
    if not hvd.is_initialized():
        return "none"
    return "mpi" if hvd.mpi_enabled() else ("gloo" if hvd.gloo_enabled() else "unknown")


def build_facts() -> dict[str, Any]:
    """What this Horovod was built with (``horovodrun --check-build`` in numbers)."""
    return {"horovod": horovod.__version__, "nccl_built": int(hvd.nccl_built()), "mpi_built": bool(hvd.mpi_built()),
            "gloo_built": bool(hvd.gloo_built()), "cuda_built": bool(hvd.cuda_built())}


def environment() -> dict[str, Any]:
    """Facts for the head of each rank's log (the device has its own line once it is chosen)."""
    import torchvision
    return {
        "rank": dist.rank(), "size": dist.size(), "local_rank": dist.local_rank(),
        "local_size": dist.local_size(), "host": socket.gethostname(), "pid": os.getpid(),
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
