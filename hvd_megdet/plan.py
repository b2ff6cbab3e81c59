"""What a training job of N ranks runs, resolved from the config and the world size alone:
the LR schedule, the BN groups and the periods (``--plan N`` and job scripts print it; the
engine trains by it). Evaluation never needs it (engine.evaluate_checkpoint): BN groups are a
training concern.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from hvd_megdet.config import Config, ConfigError, ModelConfig
from hvd_megdet.lr_schedule import Schedule


@dataclass(frozen=True)
class BNGroups:
    ranks: int             # ranks per BN group (1 = local BN, no communication)
    images: int            # images per BN statistic
    groups: int
    notice: str | None     # why the effective BN size differs from the configured one


def bn_groups(m: ModelConfig, images_per_rank: int, world_size: int) -> BNGroups:
    """The training BN groups. ``model.bn_size`` (images) becomes ``bn_size / images_per_rank``
    ranks, the whole world where it has fewer ranks than that; ``model.bn_group_size`` (ranks)
    must divide the world size; neither set = the whole world."""
    if m.norm != "syncbn":
        return BNGroups(1, images_per_rank, world_size, None)
    notice = None
    if m.bn_size:
        k = m.bn_size // images_per_rank
        if k > world_size:
            notice = (f"model.bn_size={m.bn_size} needs {k} ranks x {images_per_rank} images; this job has "
                      f"{world_size} ranks, so BN statistics span the whole world: "
                      f"BN size {world_size * images_per_rank} images")
            k = world_size
        elif world_size % k:
            raise ConfigError(f"model.bn_size={m.bn_size} is {k} ranks x {images_per_rank} images, which does "
                              f"not divide the world size {world_size}: choose a world size that is a multiple "
                              f"of {k} or another model.bn_size")
    elif m.bn_group_size:
        k = m.bn_group_size
        if world_size % k:
            raise ConfigError(f"BN group size {k} does not divide the world size {world_size} "
                              f"(model.bn_group_size): choose a divisor of {world_size}")
    else:
        k = world_size
    return BNGroups(k, k * images_per_rank, world_size // k, notice)


@dataclass(frozen=True)
class Plan:
    world_size: int
    schedule: Schedule
    bn: BNGroups
    eval_period_images: int          # 0 = only at the end
    checkpoint_period_images: int
    checkpoint_minutes: float


def resolve(cfg: Config, world_size: int) -> Plan:
    sched = Schedule.from_config(cfg.solver, world_size)
    t = cfg.train
    bn = bn_groups(cfg.model, cfg.solver.images_per_rank, world_size)
    return Plan(world_size=world_size, schedule=sched, bn=bn,
                eval_period_images=sched.period_images(t.eval_period),
                checkpoint_period_images=sched.period_images(t.checkpoint_period),
                checkpoint_minutes=t.checkpoint_minutes)


def summary(cfg: Config, p: Plan) -> dict:
    s = p.schedule
    return {"config": cfg.name, "world_size": p.world_size, "images_per_rank": cfg.solver.images_per_rank,
            "global_batch": s.global_batch, "lr": s.lr, "max_iter": s.max_iter, "total_images": s.total_images,
            "steps": list(s.steps), "warmup_iters": s.warmup_iters, "warmup_images": s.warmup_images,
            "eval_period_iters": s.iters(p.eval_period_images), "checkpoint_period_iters":
            s.iters(p.checkpoint_period_images), "checkpoint_minutes": p.checkpoint_minutes,
            "norm": cfg.model.norm, "bn_group_ranks": p.bn.ranks, "bn_size_images": p.bn.images,
            "bn_groups": p.bn.groups, "bn_notice": p.bn.notice}


def describe(cfg: Config, world_size: int) -> str:
    """Human lines, then one ``plan {json}`` line for scripts."""
    p = resolve(cfg, world_size)
    d = summary(cfg, p)
    lines = [
        f"{cfg.name} on {world_size} ranks x {d['images_per_rank']} images = global batch {d['global_batch']}, "
        f"lr {d['lr']:.6g}",
        f"  {d['max_iter']} iterations ({d['total_images']} images), lr x{cfg.solver.gamma:g} at {d['steps']}, "
        f"warmup {d['warmup_iters']} iterations ({d['warmup_images']} images)",
        f"  BN: {d['norm']}, groups of {d['bn_group_ranks']} ranks = BN size {d['bn_size_images']} images "
        f"({d['bn_groups']} groups)",
        f"  checkpoint every {d['checkpoint_period_iters']} iterations and every {d['checkpoint_minutes']:g} min; "
        f"eval " + (f"every {d['eval_period_iters']} iterations and " if d["eval_period_iters"] else "") + "at the end",
    ]
    if p.bn.notice:
        lines.append(f"  NOTICE: {p.bn.notice}")
    return "\n".join(lines + ["plan " + json.dumps(d, sort_keys=True)])
