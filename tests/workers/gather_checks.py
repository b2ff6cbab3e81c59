"""dist.gather_object on N ranks (launched by tests/test_gather.py): payloads of every kind and
size, roots other than 0, repeated default names. Each rank reports, per gather, None or a digest
of every part it received (the 3 MB part is not written back as JSON)."""
import hashlib
import pickle

import numpy as np

from hvd_megdet import dist, launch
from tests.workers.common import main


def payload(rank: int):
    """Rank 1 sends an empty list, rank 2 a few MB, the others a small nested object."""
    if rank == 1:
        return []
    if rank == 2:
        return {"blob": np.random.RandomState(2).bytes(3 * 2**20 + 17), "n": 2}
    return {"rank": rank, "detections": [{"image_id": i, "score": i / 10} for i in range(rank + 3)]}


def digest(obj) -> list:
    return [type(obj).__name__, hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()]


def summary(parts):
    return None if parts is None else [digest(p) for p in parts]


def checks(args):
    launch.init()
    r, n = dist.rank(), dist.size()
    return {"rank": r, "size": n, "controller": launch.controller(),
            "to_0": summary(dist.gather_object(payload(r), root=0, name="to_0")),
            "to_last": summary(dist.gather_object(payload(r), root=n - 1, name="to_last")),
            "default_name_1": dist.gather_object(r),       # the same default name, twice in a row
            "default_name_2": dist.gather_object(10 * r)}


if __name__ == "__main__":
    main(checks)
