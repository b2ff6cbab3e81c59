#!/usr/bin/env python
"""Train MegDet with Horovod:  horovodrun -np N python scripts/train.py [--config NAME] [key=value ...]

With no arguments: the embedded shapes_tiny demo into outputs/shapes_tiny/.
"""
from hvd_megdet import signals

signals.stop_flag()  # before the heavy imports: a preemption signal during start-up is kept, not fatal

import argparse  # noqa: E402

from hvd_megdet import app, config, plan  # noqa: E402
from hvd_megdet.engine import Trainer, evaluate_checkpoint  # noqa: E402


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


def main(args, cfg) -> int:
    if args.plan:
        print(plan.describe(cfg, args.plan))
        return 0
    out, log = app.start(cfg, args.output_dir)
    if args.eval_only:
        evaluate_checkpoint(cfg, out, log)  # the output dir's newest checkpoint, on any world size
        return 0
    trainer = Trainer(cfg, out, log)
    if args.resume:
        trainer.resume()
    code = trainer.train()
    log.info("done: outputs in %s", out)
    return code


if __name__ == "__main__":
    ARGS = parse_args()
    # --plan runs no job; --eval-only needs no BN groups and writes no timeline (it would
    # overwrite the training's)
    app.run(lambda cfg: main(ARGS, cfg), load_config=lambda: config.load(ARGS.config, ARGS.overrides),
            output_dir=ARGS.output_dir, training=not ARGS.eval_only, init_horovod=ARGS.plan is None)
