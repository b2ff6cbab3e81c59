"""The training loop: plain, iteration-based, the same collectives in the same order on every rank.

Per iteration: forward; ONE small allreduce carrying every rank's non-finite flag,
BN-group check, stop request (preemption signal), time-based checkpoint request and losses
(for logging), read back to the host once; backward (gradients averaged by Horovod); step;
periodic log / checkpoint / evaluation. A non-finite loss anywhere stops every rank together, before the backward
pass. Progress is counted in images seen (plan.py, lr_schedule.py), so periods and
resume hold on any world size.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hvd_megdet import checkpoint, data, dist, evaluation, faults, launch, optim, rng, signals, startup, sync_bn
from hvd_megdet import log as log_mod
from hvd_megdet import plan as plan_mod
from hvd_megdet.config import Config, to_dict
from hvd_megdet.data.transforms import to_device
from hvd_megdet.device import describe_device
from hvd_megdet.errors import EXIT_PREEMPTED, UserError, write_status
from hvd_megdet.lr_schedule import Schedule
from hvd_megdet.model import describe_norms
from hvd_megdet.progress import Progress, tensorboard
from hvd_megdet.watchdog import Watchdog

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED  # stopped on a signal after checkpointing; resume with --resume
# Written by rank 0 once that checkpoint is complete, BEFORE the barrier that releases the other
# ranks: srun may kill rank 0 as soon as another rank exits 75 (--kill-on-bad-exit), so job
# scripts requeue on this file, not on the exit code.
PREEMPTED_MARKER = "PREEMPTED"


class NonFiniteLoss(RuntimeError):
    pass


class InvalidBNBatch(UserError, ValueError):
    """A BN group held at most one value per channel: fixed by the config (images per rank, BN
    size, image size), not by a restart at the same place in the data."""


class Trainer:
    """Training only (evaluation of a checkpoint: :func:`evaluate_checkpoint`). BN groups smaller
    than the world must be registered before (``app.start_horovod``, while the ranks are in step);
    a plain process needs nothing."""

    def __init__(self, cfg: Config, output_dir: Path, log):
        self.cfg, self.out, self.log = cfg, Path(output_dir), log
        # from the start: a preemption signal during set-up or resume is honoured at the first iteration
        self.stop = signals.stop_flag()
        self.fault = faults.from_env()  # tests only: HVD_MEGDET_FAULT
        launch.init()  # a no-op after app.start_horovod; a plain process or a tool gets Horovod here
        self.plan = plan_mod.resolve(cfg, dist.size())
        self.sched = self.plan.schedule
        bn = self.plan.bn
        if cfg.model.norm == "syncbn":
            dist.bn_group(bn.ranks)  # registered before any collective, or a DistError naming the fix
            log.info("BN groups: %d x %d ranks x %d images = BN size %d images", bn.groups, bn.ranks,
                     cfg.solver.images_per_rank, bn.images)
        if bn.notice:
            log.warning("%s", bn.notice)
        ready = startup.build(cfg, log, bn.ranks)  # the set-up collectives, in their fixed order
        self.device, self.val_ds, self.model = ready.device, ready.val_ds, ready.model
        self.optimizer = optim.build_optimizer(self.model, cfg.solver, self.sched.lr_at(0))
        self.amp = cfg.solver.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.watchdog: Watchdog | None = None  # runs during train()
        self.images = 0          # progress: images seen by all ranks together (the unit that survives resizes)
        self.iteration = 0       # iterations of this world size's global batch (derived on resume)
        self._bn_sync_logged = False
        self.resumed_from: str | None = None
        log_model(cfg, self.val_ds, self.model, log)
        log.info("LR schedule: %s (base lr %g for %d images, %d ranks x %d images x %d passes)",
                 self.sched.describe(), cfg.solver.base_lr, cfg.solver.reference_batch, dist.size(),
                 cfg.solver.images_per_rank, cfg.solver.backward_passes_per_step)

    # --- checkpoints -----------------------------------------------------
    def sync_bn_statistics(self, why: str) -> None:
        """Every rank gets the mean of all ranks' BN running statistics (BN groups each keep their
        own): evaluation and checkpoints then use one model. Collective."""
        n = sync_bn.average_running_stats(self.model, name=f"bn_stats_{why}_{self.images}")
        if not self._bn_sync_logged and dist.size() > 1 and n:
            self.log.info("BN running statistics of %d layers averaged over all %d ranks before every "
                          "evaluation and checkpoint", n, dist.size())
            self._bn_sync_logged = True

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "images": self.images, "iteration": self.iteration, "world_size": dist.size(),
                "global_batch": self.sched.global_batch, "config": to_dict(self.cfg), "schedule": asdict(self.sched),
                "class_names": self.val_ds.class_names, "category_ids": self.val_ds.cat_ids}  # for predict.py

    def save_checkpoint(self, marker: str | None = None) -> None:
        """Rank 0 writes the checkpoint (and then ``marker``, e.g. PREEMPTED) before the barrier."""
        with self._unwatched():
            self.sync_bn_statistics("checkpoint")
            path = checkpoint.save_collective(self.out, self.images, self.state, self.device,
                                              self.cfg.train.keep_checkpoints, marker, f"{self.iteration}\n")
            if path:
                self.log.info("saved checkpoint %s (%d images, iteration %d)", path, self.images, self.iteration)
            self._last_checkpoint = time.monotonic()

    def _unwatched(self):
        """Rank 0 alone writes checkpoints and runs COCOeval while the others wait: no stall clock."""
        return self.watchdog.paused() if self.watchdog else contextlib.nullcontext()

    def resume(self) -> None:
        """``--resume``: the output dir's newest readable checkpoint (unreadable newer ones are
        skipped with a warning; temporary files of interrupted saves removed first). On another
        world size the schedule continues at the same image count."""
        path, state = checkpoint.newest_on_root(self.out, self.log, remove_temporaries=True)
        got = checkpoint.restore(path, state, self.model, self.optimizer, self.sched.global_batch)
        del state
        if got is None:
            self.log.info("no checkpoint to resume from: starting at iteration 0")
            return
        self.images, self.resumed_from = got.images, got.path
        self.iteration = self.images // self.sched.global_batch
        if self.scaler and got.scaler:
            self.scaler.load_state_dict(got.scaler)
        if got.rng and len(got.rng) == dist.size():
            rng.set_rng_state(got.rng[dist.rank()], self.device)  # bit-exact continuation
        else:  # another world size: fresh per-rank streams, a deterministic function of (seed, rank, images)
            rng.seed_all(self.cfg.train.seed, dist.rank(), salt=self.images + 1)
        self.log.info("resumed from %s: world size %s -> %d, %d images seen, iteration %d of %d, lr %.6g",
                      got.path, got.world_size, dist.size(), self.images, self.iteration,
                      self.iteration + self.sched.iters(self.sched.total_images - self.images),
                      self.sched.lr_at(self.images))

    # --- training --------------------------------------------------------
    def train(self, until_images: int | None = None) -> int:
        """Train until the schedule's total images (or ``until_images``, checkpointed there) or a
        stop signal; returns 0 or PREEMPTED_EXIT_CODE. Evaluates at the end of the schedule."""
        cfg, sched, plan = self.cfg, self.sched, self.plan
        end = sched.total_images if until_images is None else min(until_images, sched.total_images)
        end_iter = self.iteration + sched.iters(max(end - self.images, 0))
        train_ds = self._train_dataset()
        batches = iter(data.train_loader(train_ds, cfg.data, cfg.solver.images_per_rank, dist.rank(),
                                         dist.size(), cfg.train.seed, self.images))
        writer = tensorboard(self.out) if dist.is_main() else None
        progress = Progress(self.out, self.iteration, end_iter, cfg.train.log_period, self.log, writer) \
            if dist.is_main() else None
        self.model.train()
        self._last_checkpoint = time.monotonic()
        self.watchdog = Watchdog(60 * cfg.train.stall_minutes, self.log,
                                 on_stall=lambda reason: write_status("crash", f"watchdog: {reason}", dist.rank(), dist.size()))
        self.log.info("training from iteration %d to %d (%d -> %d images; schedule: %d images)",
                      self.iteration, end_iter, self.images, end, sched.total_images)
        record_run(self.out, "train", self.device, resumed_from=self.resumed_from, images=self.images,
                   iteration=self.iteration, until_images=end, global_batch=sched.global_batch)
        self.resumed_from = None  # a later train() of this Trainer continues, it does not resume
        try:
            while self.images < end:
                lr, means, stopping, checkpoint_due = self._iteration(batches)
                seen_before = self.images
                self.images += sched.global_batch
                self.iteration += 1
                if progress:
                    progress.update(self.iteration, self.images, lr, means, last=self.images >= end)
                if stopping:
                    self.log.warning("stop requested (signal on some rank) at iteration %d: checkpointing",
                                     self.iteration)
                    if crossed(seen_before, self.images, plan.eval_period_images):
                        self.log.warning("periodic evaluation at %d images skipped: stopping", self.images)
                    self.save_checkpoint(marker=PREEMPTED_MARKER)
                    return PREEMPTED_EXIT_CODE
                if crossed(seen_before, self.images, plan.checkpoint_period_images) or self.images >= end \
                        or checkpoint_due:
                    self.save_checkpoint()
                if crossed(seen_before, self.images, plan.eval_period_images) and self.images < sched.total_images:
                    self.evaluate(writer)
            if self.images >= sched.total_images:
                self.evaluate(writer)
        finally:
            self.watchdog.close()
            if progress:
                progress.close()
            if writer:
                writer.close()
        return 0

    def _train_dataset(self):
        ds = data.train_dataset(self.cfg.data)
        if ds.cat_ids != self.val_ds.cat_ids:
            raise data.DataError(f"train and val annotation files have different categories: "
                                 f"{ds.ann_file} vs {self.val_ds.ann_file}")
        startup.check_image_files(ds)
        self.log.info("training on %d images from %s", len(ds), ds.ann_file)
        self.log.info("train set: %s", ds.summary())
        return ds

    def _iteration(self, batches) -> tuple[float, dict, bool, bool]:
        """One optimizer step of ``backward_passes_per_step`` passes. Returns (lr, mean losses over
        ranks, stop requested, time-based checkpoint due)."""
        cfg, passes = self.cfg, self.cfg.solver.backward_passes_per_step
        self.watchdog.beat("data and forward", self.iteration)
        poison = self.fault.fire(self.log) if self.fault and self.fault.due(dist.rank(), self.iteration) else False
        lr = self.sched.lr_at(self.images)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.zero_grad()
        due = self.plan.checkpoint_minutes > 0 and \
            time.monotonic() - self._last_checkpoint >= 60 * self.plan.checkpoint_minutes
        means: dict[str, float] = {}
        for _ in range(passes):
            images, targets = to_device(*next(batches), self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                losses = self.model(images, targets)
            loss = sum(losses.values()) / passes
            if poison:
                loss = loss * float("nan")
            pass_means, stopping, checkpoint_due = self._agree(losses, loss, passes, self.stop.signum != 0, due)
            for k, v in pass_means.items():
                means[k] = means.get(k, 0.0) + v
            self.watchdog.beat("backward")
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.watchdog.beat("optimizer step (gradient allreduce)")
        dist.blocking("gradient allreduce", optim.step, self.optimizer, self.model, cfg.solver.clip_grad_norm,
                      self.scaler)
        means["loss"] = sum(means.values())
        return lr, means, stopping, checkpoint_due

    def _agree(self, losses: dict, loss: torch.Tensor, passes: int, stop: bool, checkpoint_due: bool):
        """ONE allreduce of a status vector built on the device and ONE device-to-host read of the
        result: which ranks saw a non-finite loss or a BN group with one value per channel, whether
        any rank must stop or asks for a time-based checkpoint, and the losses (mean over ranks)."""
        n, r, keys = dist.size(), dist.rank(), sorted(losses)
        names, counts = sync_bn.group_counts(self.model)
        v = torch.zeros(2 * n + 2 + len(keys), dtype=torch.float64, device=loss.device)
        v[r] = (~torch.isfinite(loss.detach())).double()
        if counts is not None:
            v[n + r] = (counts <= 1).any().double()
        v[2 * n], v[2 * n + 1] = float(stop), float(checkpoint_due)
        v[2 * n + 2:] = torch.stack([losses[k].detach().double() for k in keys]) / passes
        h = dist.allreduce(v, op=dist.Sum, name="iteration_status").tolist()  # the pass's one host read
        bad_bn = [i for i in range(n) if h[n + i] > 0]
        if bad_bn:  # error path: reading more is fine now
            mine = sync_bn.count_problem(names, counts.tolist()) if r in bad_bn else None
            raise InvalidBNBatch(f"invalid BN batch at iteration {self.iteration} on rank(s) {bad_bn}: "
                             f"{mine or 'see their logs'}")
        bad = [i for i in range(n) if h[i] > 0]
        if bad:
            raise NonFiniteLoss(f"non-finite loss at iteration {self.iteration} on rank(s) {bad} "
                                f"(this rank: {dict((k, float(v.detach())) for k, v in losses.items())})")
        return {k: x / n for k, x in zip(keys, h[2 * n + 2:])}, h[2 * n] > 0, h[2 * n + 1] > 0

    def evaluate(self, writer=None) -> dict:
        with self._unwatched():
            self.sync_bn_statistics("evaluation")
            return evaluate_model(self.cfg, self.model, self.val_ds, self.out, self.iteration, self.images,
                                  self.device, self.log, writer)


def evaluate_model(cfg: Config, model, val_ds, out: Path, iteration: int, images: int, device, log,
                   writer=None) -> dict:
    """COCO evaluation of ``model`` (collective); metrics also to TensorBoard when ``writer``."""
    metrics = evaluation.evaluate(model, val_ds, out, iteration, cfg.solver.images_per_rank, device,
                                  cfg.train.eval_images, cfg.train.num_visualizations, log, images_seen=images)
    if writer:
        for k in evaluation.METRIC_NAMES:
            writer.add_scalar(f"eval/{k}", metrics[k], images)
        for c in metrics["per_category"]:  # None: no GT of that category in the evaluated images
            if c["AP"] is not None:
                writer.add_scalar(f"eval_per_category/AP-{c['name']}", c["AP"], images)
    return metrics


def evaluate_checkpoint(cfg: Config, out: Path, log, path: Path | None = None, state: dict | None = None) -> dict:
    """``--eval-only`` (the output dir's newest readable checkpoint) and scripts/evaluate.py
    (``path``, with its ``state`` when already loaded): any world size, no BN groups, no optimizer."""
    ready = startup.build(cfg, log)
    log_model(cfg, ready.val_ds, ready.model, log)
    if path is None:
        path, state = checkpoint.newest_on_root(out, log)
    legacy_batch = Schedule.from_config(cfg.solver, dist.size()).global_batch
    got = checkpoint.restore(path, state, ready.model, legacy_global_batch=legacy_batch)
    del state
    iteration, images = (got.iteration, got.images) if got else (0, 0)
    record_run(out, "evaluate", ready.device, checkpoint=got.path if got else None, images=images, iteration=iteration)
    if got:
        log.info("loaded %s (%d images seen, iteration %d)", got.path, images, iteration)
    else:
        log.info("no checkpoint to resume from: starting at iteration 0")
    # one model for every rank (a no-op for a checkpoint, which holds averaged statistics)
    sync_bn.average_running_stats(ready.model, name=f"bn_stats_evaluation_{images}")
    return evaluate_model(cfg, ready.model, ready.val_ds, out, iteration, images, ready.device, log)


def record_run(out: Path, kind: str, device, **facts) -> None:
    """Rank 0 appends one line to ``<out>/runs.jsonl`` per start of training or evaluation: what
    ran where (tools read this, not the log's wording)."""
    if dist.is_main():
        rec = {"kind": kind, "time": time.time(), "world_size": dist.size(), "device": describe_device(device), **facts}
        try:  # a record, not the job: a failed write must not stop rank 0 between collectives
            with open(Path(out) / "runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            log_mod.get_logger().warning("runs.jsonl not written: %s", e)


def log_model(cfg: Config, val_ds, model, log) -> None:
    log.info("data: %s (%d val images, %d classes)", data.dataset_root(cfg.data), len(val_ds), val_ds.num_classes - 1)
    log.info("model: Faster R-CNN + FPN on %s, %.2fM parameters, norm: %s", cfg.model.backbone,
             sum(p.numel() for p in model.parameters()) / 1e6, describe_norms(model))


def crossed(before: int, after: int, period: int) -> bool:
    """Whether a multiple of ``period`` images lies in (before, after]; period 0 = never."""
    return period > 0 and before // period < after // period
