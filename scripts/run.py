#!/usr/bin/env python
"""Supervise `horovodrun ... scripts/train.py`: relaunch it with --resume after a crash.

    python scripts/run.py [--max-restarts 3] -np 16 -H node1:8,node2:8,node3:8 [--gloo|--mpi] -- [train.py args]

Each attempt is one horovodrun job. Its end is classified by the ranks' exit codes and status
files (hvd_megdet/errors.py): done (0) and preempted (75) stop; a user error (2: config, data,
weights) stops at once; anything else is a crash, relaunched with --resume from the newest valid
checkpoint until --max-restarts relaunches were spent. The host where the first failing rank ran
is blamed; a host blamed --drop-after times is dropped when the other hosts still hold -np slots.
Ends with a summary of the attempts; exits with the last attempt's class code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hvd_megdet.attempts import classify  # noqa: E402
from hvd_megdet.errors import EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR  # noqa: E402


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    out = []
    for part in spec.split(","):
        host, _, slots = part.partition(":")
        out.append((host, int(slots or 1)))
    return out


def rank_hosts(hosts: list[tuple[str, int]], np_: int) -> list[str]:
    """horovodrun places ranks on the hosts in the order given, filling each host's slots."""
    return [h for h, slots in hosts for _ in range(slots)][:np_]


def status_dir(train_args: list[str], attempt: int) -> Path:
    """Where ranks write their status files: under the (shared) --output-dir when given, so that
    ranks on other hosts are heard too; else a local temporary folder (single host)."""
    for flag, value in zip(train_args, train_args[1:]):
        if flag == "--output-dir":
            d = Path(value) / "status" / f"attempt-{attempt}"
            shutil.rmtree(d, ignore_errors=True)  # an output dir reused by a new run: no stale verdicts
            d.mkdir(parents=True)
            return d
    return Path(tempfile.mkdtemp(prefix=f"hvd_megdet-attempt{attempt}-"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-restarts", type=int, default=3, help="relaunches after crashes (default 3)")
    p.add_argument("-np", type=int, required=True, dest="np")
    p.add_argument("-H", dest="hosts", default=None, help="host:slots,... (default localhost:NP)")
    ctl = p.add_mutually_exclusive_group()
    ctl.add_argument("--gloo", action="store_const", const="--gloo", dest="controller")
    ctl.add_argument("--mpi", action="store_const", const="--mpi", dest="controller")
    p.add_argument("--drop-after", type=int, default=2, help="drop a host blamed this many times (default 2)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then scripts/train.py arguments")
    args = p.parse_args()
    train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args
    hosts = parse_hosts(args.hosts or f"localhost:{args.np}")
    blamed: dict[str, int] = {}
    history = []
    attempt, last_failure = 0, ""
    while True:
        status = status_dir(train_args, attempt)
        host_arg = ",".join(f"{h}:{s}" for h, s in hosts)
        argv = list(train_args) + (["--resume"] if attempt > 0 and "--resume" not in train_args else [])
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H", host_arg,
               *([args.controller] if args.controller else []), sys.executable, str(REPO / "scripts/train.py"), *argv]
        env = {**os.environ, "HVD_MEGDET_ATTEMPT": str(attempt), "HVD_MEGDET_STATUS_DIR": str(status),
               "HVD_MEGDET_LAST_FAILURE": last_failure}
        print(f"== run.py: attempt {attempt + 1} of at most {args.max_restarts + 1}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        lines: deque[str] = deque(maxlen=5000)  # the launcher's report of the first death is near the end
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # streamed through, kept for the launcher's report of the first death
                sys.stdout.write(line)
                lines.append(line)
            code = proc.wait()
        res = classify(code, status, "".join(lines), rank_hosts(hosts, args.np))
        kind = res["class"]
        culprit = (res["first_rank"], res["first_host"], res["first_reason"]) if res["first_rank"] >= 0 else None
        history.append({"attempt": attempt + 1, "exit": code, "class": kind, "seconds": round(time.time() - t0, 1),
                        "ended": round(time.time(), 3),
                        "first_failure": culprit, "hosts": host_arg})
        print(f"== run.py: attempt {attempt + 1} ended: exit {code}, {kind}"
              + (f"; first failure: rank {culprit[0]} on {culprit[1]}: {culprit[2]}" if culprit else ""), flush=True)
        if kind != "crash" or attempt >= args.max_restarts:
            break
        last_failure = (f"attempt {attempt + 1} crashed (exit {code})" +
                        (f": rank {culprit[0]} on {culprit[1]} failed first: {culprit[2]}" if culprit else ""))
        if culprit and res["node_problem"]:  # an OOM or a usage error follows the job to any host
            host = culprit[1]
            blamed[host] = blamed.get(host, 0) + 1
            rest = [(h, s) for h, s in hosts if h != host]
            if blamed[host] >= args.drop_after and sum(s for _, s in rest) >= args.np:
                print(f"== run.py: dropping host {host} (blamed {blamed[host]} times)", flush=True)
                hosts = rest
        attempt += 1
    print("== run.py: summary")
    for h in history:
        print("   " + json.dumps(h))
    if kind == "crash":
        print(f"== run.py: giving up after {len(history)} attempts (--max-restarts {args.max_restarts})")
    return {"done": EXIT_OK, "preempted": EXIT_PREEMPTED, "user_error": EXIT_USER_ERROR}.get(kind, EXIT_CRASH)


if __name__ == "__main__":
    sys.exit(main())
