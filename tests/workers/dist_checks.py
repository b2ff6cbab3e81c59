"""Collectives through hvd_megdet.dist on N ranks (launched by tests/test_dist.py)."""
import torch

from hvd_megdet import dist
from tests.workers.common import main


def checks(args):
    if args.raise_on_rank is not None:
        dist.init()
        if dist.rank() == int(args.raise_on_rank):
            raise RuntimeError(f"deliberate failure on rank {dist.rank()}")
        # The other ranks wait in a collective the failed rank never joins.
        dist.allreduce(torch.ones(3), name="never_completes")
        return {}
    dist.init()
    groups = [2] if dist.size() == 4 else []
    dist.init(bn_group_size=groups)  # BN groups registered after init (Horovod restarted with them)
    r, n = dist.rank(), dist.size()
    try:  # this machine has no GPU: train.device=cuda is refused on every rank, before any collective
        dist.select_device("cuda")
        out = {"cuda": "no error"}
    except dist.DeviceError as e:
        out = {"cuda": str(e)}
    dist.select_device("auto")
    out.update({"rank": r, "size": n, "controller": dist.controller(), "env": dist.environment()})
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
    main(checks, extra_args=["--raise-on-rank"])
