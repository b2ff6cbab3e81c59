#!/usr/bin/env python
"""What a failure costs: a rank killed (or hung) mid-training on 2 CPU ranks, recovered by the
horovodrun supervisor (Gloo and MPI) and by the SLURM template on a throwaway local cluster.

    python scripts/experiments/benchmark_recovery.py [--no-slurm] [--output benchmarks/recovery.json]

For each case it reads the run's records (the fault's log line, runs.jsonl, metrics.jsonl) and
prints/saves:
  detect_s   the fault (a rank SIGKILLed, or starting to hang) -> the attempt has ended
  restart_s  the attempt has ended -> the first iteration of the relaunched job
  total_s    the fault -> the first new iteration
  redone     iterations trained twice (fault iteration - resumed iteration; <= the checkpoint period)
Small shapes_tiny runs (96 px, 4 images per iteration, a checkpoint every 4 iterations, the
watchdog at 12 s): the restart figures are start-up costs that a large model pays once more.
"""
import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, read_jsonl

from hvd_megdet.localjob import job_env

SMALL = ["data.shapes_train=64", "data.shapes_val=16", "data.shapes_image_size=96", "data.min_size=96",
         "data.max_size=96", "solver.images_per_rank=2", "solver.reference_batch=4", "solver.max_iter=24",
         "solver.steps=[20]", "solver.warmup_iters=2", "train.log_period=1", "train.checkpoint_period=4",
         "train.num_visualizations=0", "train.eval_images=8", "train.stall_minutes=0.2"]
FAULT_AT = 10
_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def stamp(line: str) -> float:
    return dt.datetime.strptime(_TS.match(line)[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def measure(out: Path, ended: float) -> dict:
    fault_line = next(line for r in (0, 1) for line in (out / "logs" / f"rank-{r:05d}.log").read_text().splitlines()
                      if "FAULT injected" in line)
    t_fault = stamp(fault_line)
    resumed = next(r["iteration"] for r in read_jsonl(out / "runs.jsonl") if r.get("resumed_from"))
    t_first = min(r["time"] for r in read_jsonl(out / "metrics.jsonl") if r["time"] > ended)  # log_period 1
    return {"detect_s": round(ended - t_fault, 2), "restart_s": round(t_first - ended, 2),
            "total_s": round(t_first - t_fault, 2), "redone": FAULT_AT - resumed}


def supervisor(kind: str, controller: str, work: Path) -> dict:
    out = work / f"run-{kind}-{controller}"
    cmd = [sys.executable, str(REPO / "scripts/run.py"), "-np", "2", f"--{controller}", "--",
           "--output-dir", str(out), f"data.root={work}/shapes", *SMALL]
    res = subprocess.run(cmd, env={**job_env(), "HVD_MEGDET_FAULT": f"rank:1,iter:{FAULT_AT},kind:{kind}"},
                         capture_output=True, text=True, timeout=600)
    summary = [json.loads(line.strip()) for line in res.stdout.splitlines() if line.startswith("   {")]
    assert res.returncode == 0 and [s["class"] for s in summary] == ["crash", "done"], res.stdout[-3000:]
    return {"launcher": f"scripts/run.py + horovodrun --{controller}", "fault": kind, **measure(out, summary[0]["ended"])}


def slurm(work: Path) -> dict:
    cluster = work / "slurm"
    subprocess.run(["bash", str(REPO / "scripts/local_slurm.sh"), "start", str(cluster)], check=True,
                   capture_output=True, timeout=120)
    e = {**job_env(), "SLURM_CONF": str(cluster / "slurm.conf"), "REPO": str(REPO)}
    out = work / "run-slurm"
    try:
        job = subprocess.run(["bash", str(REPO / "slurm/smoke.sh"), "--parsable", f"--chdir={work}",
                              f"--output={work}/slurm-%j.out"], check=True, capture_output=True, text=True,
                             env={**e, "OUTPUT_DIR": str(out), "EXTRA": " ".join(SMALL),
                                  "HVD_MEGDET_FAULT": f"rank:1,iter:{FAULT_AT},kind:kill"}).stdout.strip()
        end = time.time() + 600
        while time.time() < end:
            info = subprocess.run(["scontrol", "show", "job", "-o", job], env=e, capture_output=True, text=True).stdout
            if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED)", info):
                break
            time.sleep(1)
        assert "JobState=COMPLETED" in info, info
        first = (out / "slurm" / "attempts.log").read_text().splitlines()[0]
        ended = float(re.search(r"ended=([\d.]+)", first)[1])
        return {"launcher": "slurm/megdet.sbatch (srun, local cluster, requeue)", "fault": "kill",
                **measure(out, ended)}
    finally:
        subprocess.run(["bash", str(REPO / "scripts/local_slurm.sh"), "stop", str(cluster)], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-slurm", action="store_true")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "recovery.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for kind, controller in (("kill", "gloo"), ("kill", "mpi"), ("hang", "gloo")):
            rows.append(supervisor(kind, controller, work))
            print(rows[-1], flush=True)
        if not args.no_slurm:
            rows.append(slurm(work))
            print(rows[-1], flush=True)
    print(f"\n{'launcher':55} {'fault':5} {'detect s':>9} {'restart s':>10} {'total s':>8} {'redone':>7}")
    for r in rows:
        print(f"{r['launcher']:55} {r['fault']:5} {r['detect_s']:9.1f} {r['restart_s']:10.1f} {r['total_s']:8.1f} "
              f"{r['redone']:7d}")
    Path(args.output).write_text(json.dumps({"rows": rows, "fault_iteration": FAULT_AT,
                                             "checkpoint_period_iters": 4, "stall_s": 12}, indent=1) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
