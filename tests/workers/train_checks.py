"""The real Trainer on N ranks, in one launch (one process per rank).

``--mode resume``: A, fresh, to the end of the schedule (evaluates); B, fresh, stopped at half
the images (checkpoint), then a new Trainer resumes to the end: loss falls, parameters identical
on all ranks, resume == uninterrupted.

``--mode host_reads``: tensor-to-host reads by hvd_megdet's code in each training iteration.

``--mode groups``: one run with BN groups smaller than the world; every call that averages the
BN running statistics (before each checkpoint and evaluation) is recorded on each rank with the
statistics before and after, and every evaluation with the statistics it used.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

from hvd_megdet import app, checkpoint, config, dist, engine, sync_bn
from hvd_megdet.engine import Trainer
from tests.workers.common import main


def param_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bn_stats(model) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def resume_checks(cfg, base: Path) -> dict:
    out = {}
    out_a, log = app.start(cfg, base / "A")
    a = Trainer(cfg, out_a, log)
    a.train()
    out["A_digest"] = param_digest(a.model)
    out["A_digests_all_ranks"] = dist.allgather_object(out["A_digest"])
    out["A_sum"] = float(sum(p.double().sum() for p in a.model.parameters()))
    out_b, log = app.start(cfg, base / "B")
    b1 = Trainer(cfg, out_b, log)
    half = b1.sched.total_images // 2
    b1.train(until_images=half)
    out["B_checkpoints"] = [p.name for p in checkpoint.list_checkpoints(out_b)]
    b2 = Trainer(cfg, out_b, log)
    b2.resume()
    out["B_resumed_images"], out["B_resumed_iteration"] = b2.images, b2.iteration
    b2.train()
    out["B_lrs"] = [json.loads(line)["lr"] for line in (out_b / "metrics.jsonl").read_text().splitlines()] \
        if dist.is_main() else []
    out["B_sum"] = float(sum(p.double().sum() for p in b2.model.parameters()))
    out["max_abs_diff"] = max(float((p - q).abs().max()) for p, q in
                              zip(a.model.state_dict().values(), b2.model.state_dict().values())
                              if p.dtype.is_floating_point)
    return out


def group_checks(cfg, base: Path) -> dict:
    """Spies that record and then call the real functions."""
    calls, evals = [], []
    real_average, real_evaluate = sync_bn.average_running_stats, engine.evaluation.evaluate

    def average(model, name="bn_running_stats"):
        before = bn_stats(model)
        n = real_average(model, name)
        calls.append({"name": name, "before": before, "after": bn_stats(model)})
        return n

    def evaluate(model, *a, **k):
        evals.append(bn_stats(model))
        return real_evaluate(model, *a, **k)

    sync_bn.average_running_stats, engine.evaluation.evaluate = average, evaluate
    out_dir, log = app.start(cfg, base / "G")
    t = Trainer(cfg, out_dir, log)
    t.train()
    return {"calls": calls, "evals": evals, "final": bn_stats(t.model)}


HVD_MEGDET = str(Path(engine.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def host_read_checks(cfg, base: Path) -> dict:
    """Tensor -> host reads made by hvd_megdet's own code during whole training iterations
    (forward, status allreduce, backward, optimizer step; torchvision's internals not counted):
    each is a device synchronisation on a GPU."""
    reads = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name, fn):
        def wrapped(*a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(HVD_MEGDET) and not caller.startswith(f"{HVD_MEGDET}/data/"):  # host-side input
                reads.append(f"{name} at {caller[len(HVD_MEGDET) + 1:]}:{sys._getframe(1).f_lineno}")
            return fn(*a, **k)
        return wrapped
    out_dir, log = app.start(cfg, base / "H")
    t = Trainer(cfg, out_dir, log)
    real_iteration = t._iteration
    per_iteration = []

    def iteration(batches):
        for name, fn in saved.items():
            setattr(torch.Tensor, name, spy(name, fn))
        try:
            return real_iteration(batches)
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
            per_iteration.append(list(reads))
            reads.clear()
    t._iteration = iteration
    t.train()
    return {"reads_per_iteration": per_iteration}


MODES = {"resume": resume_checks, "groups": group_checks, "host_reads": host_read_checks}


def checks(args):
    cfg = config.load("shapes_tiny", json.loads(args.overrides))
    app.start_horovod(cfg, training=True)  # the training BN groups, as scripts/train.py
    torch.manual_seed(0)
    return MODES[args.mode](cfg, Path(args.out))


if __name__ == "__main__":
    main(checks, extra_args=["--overrides", "--mode"])
