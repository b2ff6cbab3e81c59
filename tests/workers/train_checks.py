"""The real Trainer on N ranks: loss falls, parameters identical on all ranks, resume == uninterrupted.

Runs (in one launch, one process per rank):
  A: fresh, ``--iters`` iterations (to the end of the schedule: evaluates)
  B: fresh, stopped at ``--iters // 2`` (checkpoint), then a new Trainer resumes to the end.
"""
import hashlib
import json
from pathlib import Path


from hvd_megdet import app, checkpoint, config, dist
from hvd_megdet.engine import Trainer
from tests.workers.common import main


def param_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checks(args):
    dist.init()
    overrides = json.loads(args.overrides)
    iters = int(args.iters)
    base = Path(args.out)
    out = {}
    cfg = config.load("shapes_tiny", overrides)
    out_a, log = app.start(cfg, base / "A")
    a = Trainer(cfg, out_a, log)
    a.train()
    out["A_digest"] = param_digest(a.model)
    out["A_digests_all_ranks"] = dist.allgather_object(out["A_digest"])
    out["A_sum"] = float(sum(p.double().sum() for p in a.model.parameters()))
    if args.resume == "1":
        out_b, log = app.start(cfg, base / "B")
        b1 = Trainer(cfg, out_b, log)
        b1.train(until=iters // 2)
        out["B_checkpoints"] = [p.name for p in checkpoint.list_checkpoints(out_b)]
        b2 = Trainer(cfg, out_b, log)
        b2.load_checkpoint(checkpoint.latest(out_b))
        out["B_resumed_at"] = b2.iteration
        out["B_lr_at_resume"] = b2.optimizer.param_groups[0]["lr"]
        b2.train()
        out["B_digest"] = param_digest(b2.model)
        out["B_sum"] = float(sum(p.double().sum() for p in b2.model.parameters()))
        out["max_abs_diff"] = max(float((p - q).abs().max()) for p, q in
                                  zip(a.model.state_dict().values(), b2.model.state_dict().values())
                                  if p.dtype.is_floating_point)
    return out


if __name__ == "__main__":
    main(checks, extra_args=["--overrides", "--iters", "--resume"])
