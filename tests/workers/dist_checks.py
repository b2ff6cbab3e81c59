"""Collectives through hvd_megdet.dist on N ranks (launched by tests/test_dist.py)."""
import sys

import torch

from hvd_megdet import dist, launch
from hvd_megdet.device import DeviceError, select_device
from tests.workers.common import main


def hang_checks(what: str) -> dict:
    """Rank 1 stops before collective ``what``; both watchdogs fire: rank 0's names ``what`` (it
    waits in it), rank 1's says it is stuck outside any collective."""
    import logging
    import time

    from hvd_megdet.watchdog import Watchdog

    log = logging.getLogger("hang_checks")
    log.addHandler(logging.StreamHandler(sys.stdout))
    Watchdog(3.0, log)
    if dist.rank() == 1:
        time.sleep(120)
    model = torch.nn.Linear(4, 2)
    calls = {"broadcast_parameters": lambda: dist.broadcast_parameters(model.state_dict()),
             "broadcast_optimizer_state": lambda: dist.broadcast_optimizer_state(torch.optim.SGD(model.parameters(), 0.1)),
             "average_scalars": lambda: dist.average_scalars({"x": 1.0})}
    calls[what]()
    time.sleep(120)  # not reached: the collective never completes
    return {}


def checks(args):
    if args.hang_in:
        launch.init()
        return hang_checks(args.hang_in)
    if args.raise_on_rank is not None:
        launch.init()
        if dist.rank() == int(args.raise_on_rank):
            raise RuntimeError(f"deliberate failure on rank {dist.rank()}")
        # The other ranks wait in a collective the failed rank never joins.
        dist.allreduce(torch.ones(3), name="never_completes")
        return {}
    launch.init()
    groups = [2] if dist.size() == 4 else []
    launch.init(bn_group_size=groups)  # BN groups registered after init (Horovod restarted with them)
    r, n = dist.rank(), dist.size()
    try:  # this machine has no GPU: train.device=cuda is refused on every rank, before any collective
        select_device("cuda")
        out = {"cuda": "no error"}
    except DeviceError as e:
        out = {"cuda": str(e)}
    out["device"] = str(select_device("auto"))
    out.update({"rank": r, "size": n, "controller": launch.controller(), "env": launch.environment()})
    out["sum"] = dist.allreduce(torch.tensor([float(r), 1.0]), op=dist.Sum, name="s").tolist()
    out["avg"] = dist.allreduce(torch.tensor([float(r)]), op=dist.Average, name="a").tolist()
    out["gathered"] = dist.allgather_object({"r": r, "sq": r * r})
    out["bcast"] = dist.broadcast_object({"from": r, "payload": list(range(r + 1))}, root=n - 1)
    out["scalars"] = dist.average_scalars({"loss": float(r), "one": 1.0})
    if groups:
        ps = dist.bn_group(2)
        out["group_ranks"] = dist.bn_group_ranks(2)
        out["group_sum"] = dist.allreduce(torch.tensor([float(r)]), op=dist.Sum, name="g",
                                          process_set=ps).tolist()
        try:
            dist.bn_group(4 if n != 4 else 8)
            out["unregistered"] = "no error"
        except dist.DistError as e:
            out["unregistered"] = str(e)
    dist.barrier()
    return out


if __name__ == "__main__":
    main(checks, extra_args=["--raise-on-rank", "--hang-in"])
