#!/usr/bin/env python
"""Train MegDet with Horovod:  horovodrun -np N python scripts/train.py [--config NAME] [key=value ...]

With no arguments: the embedded shapes_tiny demo into outputs/shapes_tiny/.
"""
from hvd_megdet import signals

signals.stop_flag()  # before the heavy imports: a preemption signal during start-up is kept, not fatal

import argparse  # noqa: E402

from hvd_megdet import app, config, plan  # noqa: E402
from hvd_megdet.engine import Trainer  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config.DEFAULT_CONFIG,
                   help=f"config name ({', '.join(config.available())}) or a .yaml path")
    p.add_argument("--output-dir", default=None, help="default: outputs/<config name>")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--eval-only", action="store_true", help="evaluate the latest checkpoint and exit")
    p.add_argument("--plan", type=int, metavar="WORLD_SIZE", default=None,
                   help="print what a job of WORLD_SIZE ranks would run (batch, lr, BN groups, periods) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. solver.max_iter=100")
    return p.parse_intermixed_args()  # options and overrides in any order


def main(args) -> int:
    cfg = config.load(args.config, args.overrides)
    if args.plan:
        print(plan.describe(cfg, args.plan))
        return 0
    out, log = app.start(cfg, args.output_dir)
    trainer = Trainer(cfg, out, log, training=not args.eval_only)
    if args.resume or args.eval_only:
        trainer.resume()
    if args.eval_only:
        trainer.evaluate()
        return 0
    code = trainer.train()
    log.info("done: outputs in %s", out)
    return code


def timeline(args) -> str:
    """train.timeline, wanted by Horovod before hvd.init, hence before main() loads the config: a
    config that does not load gives no timeline here, and main() reports it after hvd.init, with
    the rank. --eval-only writes none (it would overwrite the training's)."""
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError:
        return ""
    return "" if args.eval_only else app.horovod_timeline(cfg, args.output_dir)


def bn_groups(args, world: int) -> int | None:
    """Ranks per training BN group on ``world`` ranks (None: none, or a config that main() will
    report): registered as Horovod process sets before anything else happens."""
    if args.eval_only:
        return None
    try:
        cfg = config.load(args.config, args.overrides)
        return plan.bn_groups(cfg.model, cfg.solver.images_per_rank, world).ranks
    except config.ConfigError:
        return None


if __name__ == "__main__":
    ARGS = parse_args()
    app.run(lambda: main(ARGS), init_horovod=ARGS.plan is None,  # --plan runs no job
            timeline=lambda: timeline(ARGS), bn_groups=lambda world: bn_groups(ARGS, world))
