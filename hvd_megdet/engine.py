"""The training loop: plain, iteration-based, the same collectives in the same order on every rank.

Per iteration: forward; ONE small allreduce carrying every rank's non-finite flag,
stop request (preemption signal), time-based checkpoint request and losses (for
logging); backward (gradients averaged by Horovod); step; periodic log / checkpoint /
evaluation. A non-finite loss anywhere stops every rank together, before the backward
pass. Progress is counted in images seen (plan.py, lr_schedule.py), so periods and
resume hold on any world size.
"""
from __future__ import annotations

import contextlib
import json
import math
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hvd_megdet import checkpoint, data, dist, evaluation, faults, optim, signals, sync_bn
from hvd_megdet import plan as plan_mod
from hvd_megdet.config import Config, to_dict
from hvd_megdet.data.transforms import to_device
from hvd_megdet.errors import EXIT_PREEMPTED, write_status
from hvd_megdet.watchdog import Watchdog
from hvd_megdet.model import WeightsError, backbone_weights_path, build_model, describe_norms, fetch_backbone_weights

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED  # stopped on a signal after checkpointing; resume with --resume
# Written by rank 0 once that checkpoint is complete, BEFORE the barrier that releases the other
# ranks: srun may kill rank 0 as soon as another rank exits 75 (--kill-on-bad-exit), so job
# scripts requeue on this file, not on the exit code.
PREEMPTED_MARKER = "PREEMPTED"


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """``training=False`` (evaluation, ``--eval-only``) needs no BN groups, optimizer or schedule
    and works on any world size."""

    def __init__(self, cfg: Config, output_dir: Path, log, training: bool = True):
        self.cfg, self.out, self.log, self.training = cfg, Path(output_dir), log, training
        # from the start: a preemption signal during set-up or resume is honoured at the first iteration
        self.stop = signals.stop_flag() if training else None
        self.fault = faults.from_env()  # tests only: HVD_MEGDET_FAULT
        self.device = dist.device()
        if cfg.train.threads_per_rank:
            torch.set_num_threads(cfg.train.threads_per_rank)
        dist.seed_all(cfg.train.seed, per_rank=False)  # identical init everywhere (then broadcast anyway)
        self.plan = plan_mod.resolve(cfg, dist.size(), training)
        self.sched = self.plan.schedule
        bn_ranks = self._register_bn_groups() if training else None  # evaluation runs on any world size
        self._prepare_data_and_weights()
        self.val_ds = data.val_dataset(cfg.data)
        check_image_files(self.val_ds)
        self.model = build_model(cfg, self.val_ds.num_classes, bn_ranks).to(self.device)
        dist.seed_all(cfg.train.seed, per_rank=True)  # per-rank RNG (RPN/ROI sampling); saved in checkpoints
        self.optimizer = optim.build_optimizer(self.model, cfg.solver, self.sched.lr_at(0)) if training else None
        dist.broadcast_parameters(self.model.state_dict())  # every rank starts from rank 0's weights
        self.amp = cfg.solver.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and training else None
        self.watchdog: Watchdog | None = None  # runs during train()
        self.images = 0          # progress: images seen by all ranks together (the unit that survives resizes)
        self.iteration = 0       # iterations of this world size's global batch (derived on resume)
        self._bn_sync_logged = False
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("data: %s (%d val images, %d classes)", data.dataset_root(cfg.data), len(self.val_ds),
                 self.val_ds.num_classes - 1)
        log.info("model: Faster R-CNN + FPN on %s, %.2fM parameters, norm: %s", cfg.model.backbone,
                 n_params / 1e6, describe_norms(self.model))
        if training:
            log.info("LR schedule: %s (base lr %g for %d images, %d ranks x %d images x %d passes)",
                     self.sched.describe(), cfg.solver.base_lr, cfg.solver.reference_batch, dist.size(),
                     cfg.solver.images_per_rank, cfg.solver.backward_passes_per_step)

    def _register_bn_groups(self) -> int:
        """The training BN groups (plan.py) as Horovod process sets; returns ranks per group."""
        bn, cfg = self.plan.bn, self.cfg
        dist.init(bn_group_size=bn.ranks)
        if cfg.model.norm == "syncbn":
            self.log.info("BN groups: %d x %d ranks x %d images = BN size %d images", bn.groups, bn.ranks,
                          cfg.solver.images_per_rank, bn.images)
        if bn.notice:
            self.log.warning("%s", bn.notice)
        return bn.ranks

    def _prepare_data_and_weights(self) -> None:
        """One rank per node generates data / downloads weights; every rank then checks the weights
        file on its own node (TORCH_HOME may be node-local), so all fail alike if one lacks it."""
        cfg, log = self.cfg, self.log
        weights = backbone_weights_path(cfg.model)  # a bad name fails here, on every rank alike
        if dist.local_rank() == 0:
            data.prepare(cfg.data, log)
            fetch_backbone_weights(cfg.model, log)
        dist.barrier()
        if weights:
            missing = {h for h, ok in dist.allgather_object((socket.gethostname(), weights[0].is_file()),
                                                            name="backbone_weights") if not ok}
            if missing:
                raise WeightsError(
                    f"model.backbone_weights={cfg.model.backbone_weights}: {weights[0]} not found on "
                    f"{sorted(missing)}" + (f" and could not be downloaded: place {weights[1]} there" if weights[1] else ""))
        if dist.is_main() and cfg.model.backbone == "resnet50" and not cfg.model.backbone_weights:
            log.warning("model.backbone_weights is empty: the backbone starts from random weights, not the "
                        "paper's recipe (ImageNet-pretrained ResNet-50): set model.backbone_weights=IMAGENET1K_V1")

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
                "global_batch": self.sched.global_batch, "config": to_dict(self.cfg), "schedule": asdict(self.sched)}

    def save_checkpoint(self, marker: str | None = None) -> None:
        """Rank 0 writes the checkpoint (and then ``marker``, e.g. PREEMPTED) before the barrier."""
        with self._unwatched():
            self._save_checkpoint(marker)

    def _unwatched(self):
        """Rank 0 alone writes checkpoints and runs COCOeval while the others wait: no stall clock."""
        return self.watchdog.paused() if self.watchdog else contextlib.nullcontext()

    def _save_checkpoint(self, marker: str | None) -> None:
        self.sync_bn_statistics("checkpoint")
        rngs = dist.allgather_object(checkpoint.rng_state(self.device), name=f"ckpt_rng_{self.images}")
        if dist.is_main():
            path = checkpoint.save(self.out, self.images, {**self.state(), "rng": rngs},
                                   self.cfg.train.keep_checkpoints)
            self.log.info("saved checkpoint %s (%d images, iteration %d)", path, self.images, self.iteration)
            if marker:  # job scripts requeue on this file, whatever srun's exit code
                (self.out / marker).write_text(f"{self.iteration}\n")
        self._last_checkpoint = time.monotonic()
        dist.barrier()

    def resume(self) -> None:
        """``--resume`` / ``--eval-only``: the output dir's newest readable checkpoint (unreadable
        newer ones are skipped with a warning); training first removes temporary files of
        interrupted saves (evaluation must not: a training job may be saving into the same dir)."""
        path = state = None
        if dist.is_main():
            if self.training:
                checkpoint.remove_stale_temporaries(self.out, self.log)
            path, state = checkpoint.newest_valid(self.out, self.log)
        self._restore(path, state)

    def load_checkpoint(self, path: Path, state: dict | None = None) -> None:
        """Load ``path`` (or its already loaded ``state``) on rank 0 and share it."""
        if dist.is_main() and state is None:
            state = checkpoint.load(path)
        self._restore(path, state)

    def _restore(self, path: Path | None, state: dict | None) -> None:
        """Rank 0's ``state`` to every rank: parameters, optimizer and scaler state, progress in
        images, each rank's RNG. On another world size the schedule continues at the same image count."""
        path = dist.broadcast_object(str(path) if path else None, name="ckpt_path")
        if path is None:
            self.log.info("no checkpoint to resume from: starting at iteration 0")
            return
        meta = None
        if dist.is_main():
            try:  # a checkpoint of another model or config: every rank must learn it, not hang
                self.model.load_state_dict(state["model"])
                if self.training:
                    self.optimizer.load_state_dict(state["optimizer"])
                legacy_batch = state.get("schedule", {}).get("global_batch", self.sched.global_batch)
                meta = {"rng": state.get("rng"), "world_size": state.get("world_size"),
                        "images": state.get("images", state["iteration"] * legacy_batch),
                        "iteration": state["iteration"], "scaler": state.get("scaler")}
            except (KeyError, ValueError, RuntimeError) as e:
                meta = {"error": f"checkpoint {path} does not fit this model/config: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        meta = dist.broadcast_object(meta, name="ckpt_meta")
        if "error" in meta:
            raise checkpoint.CheckpointError(meta["error"])
        if self.training:
            # optimizer state first: Horovod initialises empty state with a step, which the
            # parameter broadcast then overwrites.
            dist.broadcast_optimizer_state(self.optimizer)
        dist.broadcast_parameters(self.model.state_dict())
        self.images = meta["images"]
        if not self.training:  # report the checkpoint's own iteration
            self.iteration = meta["iteration"]
            self.log.info("loaded %s (%d images seen, iteration %d)", path, self.images, self.iteration)
            return
        self.iteration = self.images // self.sched.global_batch
        if self.scaler and meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        rngs, old_world = meta["rng"], meta["world_size"]
        if rngs and len(rngs) == dist.size():
            checkpoint.set_rng_state(rngs[dist.rank()], self.device)  # bit-exact continuation
        else:  # another world size: fresh per-rank streams, a deterministic function of (seed, rank, images)
            dist.seed_all(self.cfg.train.seed, per_rank=True, salt=self.images + 1)
        self.log.info("resumed from %s: world size %s -> %d, %d images seen, iteration %d of %d, lr %.6g",
                      path, old_world, dist.size(), self.images, self.iteration,
                      self.iteration + self.sched.iters(self.sched.total_images - self.images),
                      self.sched.lr_at(self.images))

    # --- training --------------------------------------------------------
    def _agree(self, loss: torch.Tensor, losses: dict, stop: bool, checkpoint_due: bool, bn_problem: bool):
        """One allreduce: which ranks saw a non-finite loss or an invalid BN group batch, whether any
        rank must stop or asks for a time-based checkpoint, mean losses."""
        n, keys = dist.size(), sorted(losses)
        v = torch.zeros(2 * n + 2 + len(keys), dtype=torch.float64)
        v[dist.rank()] = float(not math.isfinite(float(loss.detach())))
        v[n + dist.rank()] = float(bn_problem)
        v[2 * n], v[2 * n + 1] = float(stop), float(checkpoint_due)
        v[2 * n + 2:] = torch.tensor([float(losses[k]) for k in keys], dtype=torch.float64)
        v = dist.allreduce(v, op=dist.Sum, name="iteration_status")
        bad = [r for r in range(n) if v[r] > 0]
        bad_bn = [r for r in range(n) if v[n + r] > 0]
        means = {k: float(x) / n for k, x in zip(keys, v[2 * n + 2:].tolist())}
        return bad, bad_bn, bool(v[2 * n] > 0), bool(v[2 * n + 1] > 0), means

    def train(self, until_images: int | None = None) -> int:
        """Train until the schedule's total images (or ``until_images``, checkpointed there) or a
        stop signal; returns 0 or PREEMPTED_EXIT_CODE. Evaluates at the end of the schedule."""
        cfg, sched, plan, passes = self.cfg, self.sched, self.plan, self.cfg.solver.backward_passes_per_step
        end = sched.total_images if until_images is None else min(until_images, sched.total_images)
        end_iter = self.iteration + sched.iters(max(end - self.images, 0))
        train_ds = data.train_dataset(cfg.data)
        if train_ds.cat_ids != self.val_ds.cat_ids:
            raise data.DataError(f"train and val annotation files have different categories: "
                                 f"{train_ds.ann_file} vs {self.val_ds.ann_file}")
        check_image_files(train_ds)
        self.log.info("training on %d images from %s", len(train_ds), train_ds.ann_file)
        loader = data.train_loader(train_ds, cfg.data, cfg.solver.images_per_rank, dist.rank(),
                                   dist.size(), cfg.train.seed, self.images)
        batches = iter(loader)
        writer = self._tensorboard()
        metrics_file = open(self.out / "metrics.jsonl", "a") if dist.is_main() else None
        progress = Progress(self.iteration, end_iter, self.log) if dist.is_main() else None
        self.model.train()
        self._last_checkpoint = time.monotonic()
        self.watchdog = Watchdog(60 * cfg.train.stall_minutes, self.log,
                                 on_stall=lambda reason: write_status("crash", f"watchdog: {reason}"))
        self.log.info("training from iteration %d to %d (%d -> %d images; schedule: %d images)",
                      self.iteration, end_iter, self.images, end, sched.total_images)
        try:
            while self.images < end:
                self.watchdog.beat("data and forward", self.iteration)
                poison = self.fault.fire(self.log) if self.fault and self.fault.due(dist.rank(), self.iteration) \
                    else False
                lr = sched.lr_at(self.images)
                optim.set_lr(self.optimizer, lr)
                self.optimizer.zero_grad()
                due = plan.checkpoint_minutes > 0 and \
                    time.monotonic() - self._last_checkpoint >= 60 * plan.checkpoint_minutes
                sums: dict[str, float] = {}
                for _ in range(passes):
                    images, targets = to_device(*next(batches), self.device)
                    with torch.autocast(self.device.type, enabled=self.amp):
                        losses = self.model(images, targets)
                    bn_problem = sync_bn.check_group_counts(self.model)
                    loss = sum(losses.values()) / passes
                    if poison:
                        loss = loss * float("nan")
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / passes
                    bad, bad_bn, stopping, checkpoint_due, means = self._agree(
                        loss, {**sums, "loss": sum(sums.values())}, self.stop.signum != 0, due, bool(bn_problem))
                    if bad_bn:
                        raise ValueError(f"invalid BN batch at iteration {self.iteration} on rank(s) {bad_bn}: "
                                         f"{bn_problem or 'see their logs'}")
                    if bad:
                        raise NonFiniteLoss(f"non-finite loss at iteration {self.iteration} on rank(s) {bad} "
                                            f"(this rank: {dict((k, float(v.detach())) for k, v in losses.items())})")
                    self.watchdog.beat("backward")
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                self.watchdog.beat("optimizer step (gradient allreduce)")
                dist.blocking("gradient allreduce", optim.step, self.optimizer, self.model,
                              cfg.solver.clip_grad_norm, self.scaler)
                seen_before = self.images
                self.images += sched.global_batch
                self.iteration += 1
                if progress:
                    progress.update(self.iteration, lr, means)
                    if self.iteration % cfg.train.log_period == 0 or self.images >= end:
                        record = {"iteration": self.iteration, "images": self.images, "lr": lr, **means,
                                  "it_per_s": progress.rate(), "time": time.time()}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        progress.log_line(self.iteration, lr, means)
                        if writer:
                            for k, v in {"lr": lr, **means}.items():
                                writer.add_scalar(f"train/{k}", v, self.images)
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
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()
        return 0

    def evaluate(self, writer=None) -> dict:
        with self._unwatched():
            return self._evaluate(writer)

    def _evaluate(self, writer=None) -> dict:
        c = self.cfg
        self.sync_bn_statistics("evaluation")
        metrics = evaluation.evaluate(self.model, self.val_ds, self.out, self.iteration, c.solver.images_per_rank,
                                      self.device, c.train.eval_images, c.train.num_visualizations, self.log,
                                      images_seen=self.images)
        if writer:
            for k in evaluation.METRIC_NAMES:
                writer.add_scalar(f"eval/{k}", metrics[k], self.images)
        return metrics

    def _tensorboard(self):
        if not dist.is_main():
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.out / "tensorboard"))


def crossed(before: int, after: int, period: int) -> bool:
    """Whether a multiple of ``period`` images lies in (before, after]; period 0 = never."""
    return period > 0 and before // period < after // period


def check_image_files(ds) -> None:
    """Rank 0 checks that every image file exists (threads); every rank raises the same error.
    Per-rank startup stays at parsing the annotation file (128 ranks x 118k stats avoided)."""
    problem = ds.missing_files() if dist.is_main() else None
    problem = dist.broadcast_object(problem, name=f"image_check_{ds.ann_file.name}")
    if problem:
        raise data.DataError(problem)


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
