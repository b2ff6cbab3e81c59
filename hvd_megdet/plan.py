"""What a job of N ranks would run, resolved without launching it (job scripts print this)."""
from __future__ import annotations

import json

from hvd_megdet.config import Config, ConfigError
from hvd_megdet.lr_schedule import Schedule


def resolve(cfg: Config, world_size: int) -> dict:
    sched = Schedule.from_config(cfg.solver, world_size)
    group = cfg.model.bn_group_size or world_size
    if cfg.model.norm == "syncbn" and world_size % group:
        raise ConfigError(f"model.bn_group_size={group} does not divide the world size {world_size}")
    return {"config": cfg.name, "world_size": world_size, "images_per_rank": cfg.solver.images_per_rank,
            "global_batch": sched.global_batch, "lr": sched.lr, "max_iter": sched.max_iter,
            "steps": list(sched.steps), "warmup_iters": sched.warmup_iters, "norm": cfg.model.norm,
            "bn_group_ranks": group if cfg.model.norm == "syncbn" else 1,
            "bn_size_images": (group if cfg.model.norm == "syncbn" else 1) * cfg.solver.images_per_rank,
            "bn_groups": world_size // group if cfg.model.norm == "syncbn" else world_size}


def describe(cfg: Config, world_size: int) -> str:
    return "plan " + json.dumps(resolve(cfg, world_size), sort_keys=True)
