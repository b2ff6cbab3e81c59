"""What every entry point does first: the config (loaded once), Horovod (with the timeline and the
training BN groups the config asks for), output folder, per-rank log, and turning any error on
any rank into a logged, non-zero exit instead of a hang."""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

from typing import Callable

from hvd_megdet import config as config_mod
from hvd_megdet import dist, errors, launch, plan, signals
from hvd_megdet import log as log_mod
from hvd_megdet.errors import EXIT_CRASH, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError

DEFAULT_OUTPUT_ROOT = "outputs"


EXIT_GRACE_S = 2.0


class OutputDirError(UserError, OSError):
    """The output directory cannot be created or written (a path or permission: no restart fixes it)."""


def output_path(cfg: config_mod.Config, output_dir: str | None) -> Path:
    """The run's output folder: ``output_dir``, else outputs/<config name>."""
    return Path(output_dir or Path(DEFAULT_OUTPUT_ROOT) / cfg.name).expanduser().resolve()


def horovod_timeline(cfg: config_mod.Config, output_dir: str | None) -> str:
    """``train.timeline`` as the absolute path Horovod wants before ``hvd.init`` ("" = off): a
    relative path is taken in the output folder, which is created for it (rank 0's Horovod opens
    the file inside ``hvd.init``, before :func:`start` runs)."""
    if not cfg.train.timeline:
        return ""
    path = output_path(cfg, output_dir) / Path(cfg.train.timeline).expanduser()  # an absolute one stays
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def start_horovod(cfg: config_mod.Config | None = None, output_dir: str | None = None, training: bool = False) -> None:
    """Horovod for this job: for training, Horovod's timeline (``train.timeline``, read inside
    ``hvd.init``) and the training BN groups (plan.py) registered as process sets right away, while
    the ranks are still in step (static sets restart Horovod, launch.init). Evaluation and
    prediction register none: they run on any world size."""
    launch.init(timeline=horovod_timeline(cfg, output_dir) if cfg and training else "")
    if cfg and training:
        try:
            groups = plan.bn_groups(cfg.model, cfg.solver.images_per_rank, dist.size())
        except config_mod.ConfigError:
            return  # the Trainer's plan raises it again, once the rank's log exists
        launch.init(bn_group_size=groups.ranks)


def start(cfg: config_mod.Config, output_dir: str | None, write_config: bool = True):
    """Create the output folder and this rank's log. Returns (out, logger)."""
    out = output_path(cfg, output_dir)
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        probe = out / "logs" / f".write-test-{dist.rank()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output directory {out} cannot be written: {e.strerror or e}") from None
    log = log_mod.setup(out, dist.rank())
    # one line on every rank's stdout (SLURM's per-task files), pointing at the full log
    print(f"hvd_megdet rank {dist.rank()}/{dist.size()} on {socket.gethostname()}: "
          f"log {log_mod.rank_log_path(out, dist.rank())}", flush=True)
    log_mod.log_environment(log, launch.environment())
    if dist.is_main():
        log.info("output directory: %s", out)
        if os.environ.get("HVD_MEGDET_LAST_FAILURE"):  # set by the launcher that restarted this job
            log.warning("attempt %d, restarted after: %s", int(os.environ.get("HVD_MEGDET_ATTEMPT", "0")) + 1,
                        os.environ["HVD_MEGDET_LAST_FAILURE"])
        if write_config:
            (out / "config.yaml").write_text(config_mod.to_yaml(cfg))
    return out, log


def run(main: Callable, load_config: Callable[[], config_mod.Config] | None = None,
        output_dir: str | None = None, training: bool = False, init_horovod: bool = True) -> None:
    """Run ``main(cfg)`` (``main()`` without ``load_config``) on this rank and exit with a code
    that says what happened (hvd_megdet/errors.py): 0 done, 75 preempted, 2 user error, 1 crash. On
    an exception, log it with the rank, write this rank's status file for the launcher, and exit
    at once (``os._exit``: no interpreter teardown that could wait on dead peers).

    The config is loaded once, before Horovod starts (the timeline and the BN groups need it); a
    config that does not load starts Horovod plainly and is reported after, with the rank.
    ``training``: start_horovod's timeline and BN groups."""
    signals.stop_flag()  # from the first instant: a preemption signal during start-up is kept
    try:
        cfg = bad = None
        if load_config:
            try:
                cfg = load_config()
            except config_mod.ConfigError as e:
                bad = e
        if init_horovod:
            start_horovod(cfg, output_dir, training)
        if bad:
            raise bad
        code = main(cfg) if load_config else main()
    except BaseException as e:  # noqa: BLE001 - every failure must end the job, never hang it
        if isinstance(e, SystemExit) and not e.code:
            raise
        user = isinstance(e, UserError) or (isinstance(e, SystemExit) and e.code == EXIT_USER_ERROR)
        where = f"rank {dist.rank()}/{dist.size()}"
        msg = f"{where}: {type(e).__name__}: {e}"
        logger = log_mod.get_logger()
        if logger.handlers:
            logger.error("%s%s\n%s", "user error (no restart can fix it): " if user else "crash: ", msg,
                         traceback.format_exc())
        if not (logger.handlers and dist.is_main()):  # rank 0's log already went to the console
            print(f"ERROR {msg}", file=sys.stderr, flush=True)
        errors.write_status("user_error" if user else "crash", f"{type(e).__name__}: {e}", dist.rank(), dist.size())
        sys.stdout.flush()
        # mpirun/srun tear the whole job down as soon as one rank exits non-zero; a short grace
        # lets the other ranks, usually failing the same way, report their reason too.
        time.sleep(EXIT_GRACE_S)
        os._exit(EXIT_USER_ERROR if user else EXIT_CRASH)
    if code == EXIT_PREEMPTED:
        errors.write_status("preempted", "stopped on a signal after a checkpoint", dist.rank(), dist.size())
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
