"""The training loop: plain, iteration-based, the same collectives in the same order on every rank.

Per iteration: forward; ONE small allreduce carrying every rank's non-finite flag,
stop request (preemption signal) and losses (for logging); backward (gradients
averaged by Horovod); step; periodic log / checkpoint / evaluation. A non-finite
loss anywhere stops every rank together, before the backward pass.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hvd_megdet import checkpoint, data, dist, evaluation, optim
from hvd_megdet.config import Config, to_dict
from hvd_megdet.data.transforms import to_device
from hvd_megdet.lr_schedule import Schedule
from hvd_megdet.model import build_model, describe_norms

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal after checkpointing; resume with --resume
# Written by rank 0 once that checkpoint is complete. srun may kill the slower ranks when the first
# one exits 75 (--kill-on-bad-exit), so job scripts requeue on this file, not on the exit code.
PREEMPTED_MARKER = "PREEMPTED"


class NonFiniteLoss(RuntimeError):
    pass


class StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption)."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signum = 0
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


class Trainer:
    def __init__(self, cfg: Config, output_dir: Path, log):
        self.cfg, self.out, self.log = cfg, Path(output_dir), log
        self.device = dist.device()
        if cfg.train.threads_per_rank:
            torch.set_num_threads(cfg.train.threads_per_rank)
        dist.seed_all(cfg.train.seed, per_rank=False)  # identical init everywhere (then broadcast anyway)
        self.sched = Schedule.from_config(cfg.solver, dist.size())
        if dist.local_rank() == 0:
            data.prepare(cfg.data, log)
        dist.barrier()
        self.val_ds = data.val_dataset(cfg.data)
        self.model = build_model(cfg, self.val_ds.num_classes).to(self.device)
        dist.seed_all(cfg.train.seed, per_rank=True)  # per-rank RNG (RPN/ROI sampling); saved in checkpoints
        self.optimizer = optim.build_optimizer(self.model, cfg.solver, self.sched.lr_at(0))
        dist.broadcast_parameters(self.model.state_dict())  # every rank starts from rank 0's weights
        self.amp = cfg.solver.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.iteration = 0
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("data: %s (%d val images, %d classes)", data.dataset_root(cfg.data), len(self.val_ds),
                 self.val_ds.num_classes - 1)
        log.info("model: Faster R-CNN + FPN on %s, %.2fM parameters, norm: %s", cfg.model.backbone,
                 n_params / 1e6, describe_norms(self.model))
        log.info("LR schedule: %s (base lr %g for %d images, %d ranks x %d images x %d passes)", self.sched.describe(),
                 cfg.solver.base_lr, cfg.solver.reference_batch, dist.size(), cfg.solver.images_per_rank,
                 cfg.solver.backward_passes_per_step)

    # --- checkpoints -----------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "config": to_dict(self.cfg), "world_size": dist.size(),
                "schedule": asdict(self.sched)}

    def save_checkpoint(self) -> None:
        rngs = dist.allgather_object(checkpoint.rng_state(), name=f"ckpt_rng_{self.iteration}")
        if dist.is_main():
            path = checkpoint.save(self.out, self.iteration, {**self.state(), "rng": rngs},
                                   self.cfg.train.keep_checkpoints)
            self.log.info("saved checkpoint %s", path)
        dist.barrier()

    def load_checkpoint(self, path: Path | None) -> None:
        """Load on rank 0 and broadcast: parameters, optimizer state, iteration, each rank's RNG."""
        path = dist.broadcast_object(str(path) if path else None, name="ckpt_path")
        if path is None:
            self.log.info("no checkpoint to resume from: starting at iteration 0")
            return
        rngs, it = None, 0
        if dist.is_main():
            state = checkpoint.load(path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            rngs, it = state.get("rng"), state["iteration"]
        # optimizer state first: Horovod initialises empty state with a step, which the
        # parameter broadcast then overwrites.
        dist.broadcast_optimizer_state(self.optimizer)
        dist.broadcast_parameters(self.model.state_dict())
        rngs, self.iteration = dist.broadcast_object((rngs, it), name="ckpt_meta")
        if rngs and len(rngs) == dist.size():
            checkpoint.set_rng_state(rngs[dist.rank()])
        else:
            self.log.warning("checkpoint has RNG states for %s ranks, not %d: not restored",
                             len(rngs) if rngs else 0, dist.size())
        self.log.info("resumed from %s at iteration %d (lr %.6g)", path, self.iteration,
                      self.sched.lr_at(self.iteration))

    # --- training --------------------------------------------------------
    def _agree(self, loss: torch.Tensor, losses: dict, stop: bool):
        """One allreduce: which ranks saw a non-finite loss, whether any rank must stop, mean losses."""
        n, keys = dist.size(), sorted(losses)
        v = torch.zeros(n + 1 + len(keys), dtype=torch.float64)
        v[dist.rank()] = float(not math.isfinite(float(loss.detach())))
        v[n] = float(stop)
        v[n + 1:] = torch.tensor([float(losses[k]) for k in keys], dtype=torch.float64)
        v = dist.allreduce(v, op=dist.Sum, name="iteration_status")
        bad = [r for r in range(n) if v[r] > 0]
        means = {k: float(x) / n for k, x in zip(keys, v[n + 1:].tolist())}
        return bad, bool(v[n] > 0), means

    def train(self, until: int | None = None) -> int:
        """Train until ``max_iter`` (or iteration ``until``, checkpointed there) or a stop
        signal; returns 0 or PREEMPTED_EXIT_CODE. Evaluates at the end of the schedule."""
        cfg, sched, passes = self.cfg, self.sched, self.cfg.solver.backward_passes_per_step
        end = sched.max_iter if until is None else min(until, sched.max_iter)
        stop = StopFlag()
        train_ds = data.train_dataset(cfg.data)
        if train_ds.cat_ids != self.val_ds.cat_ids:
            raise data.DataError(f"train and val annotation files have different categories: "
                                 f"{train_ds.ann_file} vs {self.val_ds.ann_file}")
        self.log.info("training on %d images from %s", len(train_ds), train_ds.ann_file)
        loader = data.train_loader(train_ds, cfg.data, cfg.solver.images_per_rank, dist.rank(),
                                   dist.size(), cfg.train.seed, self.iteration * passes)
        batches = iter(loader)
        writer = self._tensorboard()
        metrics_file = open(self.out / "metrics.jsonl", "a") if dist.is_main() else None
        progress = Progress(self.iteration, end, self.log) if dist.is_main() else None
        self.model.train()
        self.log.info("training from iteration %d to %d (schedule: %d)", self.iteration, end, sched.max_iter)
        try:
            while self.iteration < end:
                it = self.iteration
                lr = sched.lr_at(it)
                optim.set_lr(self.optimizer, lr)
                self.optimizer.zero_grad()
                sums: dict[str, float] = {}
                for _ in range(passes):
                    images, targets = to_device(*next(batches), self.device)
                    with torch.autocast(self.device.type, enabled=self.amp):
                        losses = self.model(images, targets)
                    loss = sum(losses.values()) / passes
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / passes
                    bad, stopping, means = self._agree(loss, {**sums, "loss": sum(sums.values())},
                                                       stop.signum != 0)
                    if bad:
                        raise NonFiniteLoss(f"non-finite loss at iteration {it} on rank(s) {bad} "
                                            f"(this rank: {dict((k, float(v.detach())) for k, v in losses.items())})")
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                optim.step(self.optimizer, self.model, cfg.solver.clip_grad_norm, self.scaler)
                self.iteration = it + 1
                if progress:
                    progress.update(self.iteration, lr, means)
                    if self.iteration % cfg.train.log_period == 0 or self.iteration == end:
                        record = {"iteration": self.iteration, "lr": lr, **means,
                                  "it_per_s": progress.rate(), "time": time.time()}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        progress.log_line(self.iteration, lr, means)
                        if writer:
                            for k, v in {"lr": lr, **means}.items():
                                writer.add_scalar(f"train/{k}", v, self.iteration)
                if stopping:
                    self.log.warning("stop requested (signal on some rank) at iteration %d: checkpointing",
                                     self.iteration)
                    self.save_checkpoint()
                    if dist.is_main():  # job scripts requeue on this file, whatever srun's exit code
                        (self.out / PREEMPTED_MARKER).write_text(f"{self.iteration}\n")
                    return PREEMPTED_EXIT_CODE
                if self.iteration % cfg.train.checkpoint_period == 0 or self.iteration == end:
                    self.save_checkpoint()
                if cfg.train.eval_period and self.iteration % cfg.train.eval_period == 0 \
                        and self.iteration < sched.max_iter:
                    self.evaluate(writer)
            if self.iteration == sched.max_iter:
                self.evaluate(writer)
        finally:
            if progress:
                progress.close()
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()
        return 0

    def evaluate(self, writer=None) -> dict:
        c = self.cfg
        metrics = evaluation.evaluate(self.model, self.val_ds, self.out, self.iteration, c.solver.images_per_rank,
                                      self.device, c.train.eval_images, c.train.num_visualizations, self.log)
        if writer:
            for k in evaluation.METRIC_NAMES:
                writer.add_scalar(f"eval/{k}", metrics[k], self.iteration)
        return metrics

    def _tensorboard(self):
        if not dist.is_main():
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.out / "tensorboard"))


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal, else a periodic log line (it/s, ETA, lr, losses)."""

    def __init__(self, start: int, total: int, log):
        self.start, self.total, self.log = start, total, log
        self.t0 = time.time()
        self._done = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def rate(self) -> float:
        done = self._done
        return done / max(time.time() - self.t0, 1e-9) if done else 0.0

    def update(self, it: int, lr: float, means: dict) -> None:
        self._done = it - self.start
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.4g}", refresh=False)

    def log_line(self, it: int, lr: float, means: dict) -> None:
        rate = self.rate()
        eta = (self.total - it) / rate if rate else float("nan")
        parts = " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in sorted(means.items()) if k != "loss")
        self.log.info("iter %d/%d (%.0f%%) %.2f it/s ETA %s lr %.5g loss %.4f (%s)", it, self.total,
                      100 * it / self.total, rate, _fmt_eta(eta), lr, means["loss"], parts)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
