"""The SLURM templates, submitted with sbatch to a real single-node SLURM started for the tests
(scripts/local_slurm.sh), and the 128-GPU template checked against a 16 x 8-GPU slurm.conf."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import BIN, REPO, run

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                                 reason="SLURM not installed (scripts/setup.sh --slurm installs it)")]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def local_cluster(d: Path, *start: str):
    """Start scripts/local_slurm.sh in ``d``; yield the environment that submits to it; stop it."""
    res = run(["bash", str(LOCAL_SLURM), start[0], str(d), *start[1:]], timeout=90)
    assert res.returncode == 0, res.stdout
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PATH": f"{BIN}:{os.environ['PATH']}",
           "REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        yield env
    finally:
        run(["bash", str(LOCAL_SLURM), "stop", str(d)], timeout=90)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from local_cluster(tmp_path_factory.mktemp("slurm"), "start")


def job_info(job: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(job: str, env, timeout: float, done=lambda info: info.get("JobState") in TERMINAL) -> dict:
    """Poll scontrol (sbatch --wait notices the end 10-40 s late)."""
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(job, env)
        if done(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} not done after {timeout}s: {job_info(job, env)}")


def submit(script: list[str], env, tmp_path: Path, extra_env: dict) -> str:
    res = subprocess.run(["bash", *script, "--parsable", f"--chdir={tmp_path}",
                          f"--output={tmp_path}/slurm-%j.out"], env={**env, **extra_env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def batch_output(tmp_path: Path, job: str) -> str:
    f = tmp_path / f"slurm-{job}.out"
    return f.read_text() if f.exists() else "(no batch output)"


def test_smoke_job_completes(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], cluster, tmp_path, {"OUTPUT_DIR": str(out)})
    info = wait_for(job, cluster, timeout=400)
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "srun --mpi=pmix" in log and "tasks: 2" in log and '"global_batch": 8' in log
    for r in range(2):
        srun_out = (out / "slurm" / "attempt-0" / f"rank-{r}.out").read_text()
        assert f"hvd_megdet rank {r}/2" in srun_out
        assert f"rank {r} of 2" in (out / "logs" / f"rank-{r:05d}.log").read_text()
    assert (out / "checkpoints" / "model_img0000000160.pth").is_file()  # 20 iterations x 8 images
    assert json.loads((out / "eval" / "metrics.json").read_text())["iteration"] == 20
    assert (out / "metrics.jsonl").read_text().count("\n") >= 4


def wait_for_metrics(out: Path, lines: int, job: str, env, tmp_path: Path) -> None:
    metrics = out / "metrics.jsonl"
    end = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert time.time() < end, batch_output(tmp_path, job)
        assert job_info(job, env).get("JobState") not in TERMINAL, batch_output(tmp_path, job)
        time.sleep(0.3)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# shapes_tiny (8 images per iteration on 2 ranks), DataLoader workers as on a real cluster,
# a checkpoint every 4 iterations
SIGNAL_RUN = ("solver.max_iter=40 solver.steps=[35] solver.warmup_iters=5 train.log_period=2 "
              "train.checkpoint_period=4 train.eval_images=8 train.num_visualizations=0 data.workers=2")


@pytest.mark.parametrize("signal, full", [("USR1", True), ("TERM", False), ("TERM", True)])
def test_signals_checkpoint_requeue_and_resume(cluster, tmp_path, signal, full):
    """USR1 or TERM to every process of the job (ranks, DataLoader workers, with --full the batch
    shell and srun too): requeue, resume, completion. To the ranks, a signal means a fresh
    checkpoint; srun itself answers TERM by killing its tasks at once, so with TERM --full the job
    resumes from the newest periodic checkpoint instead (at most one period redone)."""
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], cluster, tmp_path, {"OUTPUT_DIR": str(out), "EXTRA": SIGNAL_RUN})
    wait_for_metrics(out, 4, job, cluster, tmp_path)  # past iteration 8
    subprocess.run(["scancel", f"--signal={signal}", *(["--full"] if full else []), job], env=cluster, check=True)
    info = wait_for(job, cluster, timeout=600)  # a requeued job passes through REQUEUED/PENDING
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "requeueing job" in log and "attempt 2 (restart 1" in log, log
    rank0 = (out / "logs" / "rank-00000.log").read_text()
    resumed = re.search(r"resumed from .*model_img(\d+).pth: world size 2 -> 2, (\d+) images seen, "
                        r"iteration (\d+) of 40", rank0)
    assert resumed, rank0
    iters = [r["iteration"] for r in records(out)]
    assert iters[-1] == 40 and records(out)[-1]["images"] == 320
    if signal == "TERM" and full:
        assert "srun killed the ranks before they could checkpoint" in log, log
        stopped_by = max(i for i in iters if i <= int(resumed[3]) + 4)
        assert int(resumed[3]) % 4 == 0 and stopped_by - int(resumed[3]) <= 4   # at most one period redone
    else:
        stopped = int(re.search(r"stop requested .* at iteration (\d+)", rank0)[1])
        assert 8 <= stopped < 40 and int(resumed[3]) == stopped and int(resumed[1]) == 8 * stopped
        assert iters == sorted(iters) and len(iters) == len(set(iters)), iters
    for f in (out / "slurm" / "attempt-0").glob("rank-*.out"):
        assert "DataLoader worker" not in f.read_text(errors="replace"), f.read_text(errors="replace")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two pretend nodes (gpu01, gpu02) with 2 CPUs each on this machine: a job can move."""
    yield from local_cluster(tmp_path_factory.mktemp("slurm2"), "start-fake", "2", "0", "2")


CRASH_RUN = ("solver.max_iter=24 solver.steps=[20] solver.warmup_iters=2 train.log_period=2 "
             "train.checkpoint_period=4 train.eval_images=8 train.num_visualizations=0")


def attempts(out: Path) -> list[str]:
    return (out / "slurm" / "attempts.log").read_text().splitlines()


def test_killed_rank_requeues_on_another_node_and_completes(two_nodes, tmp_path):
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], two_nodes, tmp_path,
                 {"OUTPUT_DIR": str(out), "EXTRA": CRASH_RUN, "HVD_MEGDET_FAULT": "rank:1,iter:10,kind:kill"})
    info = wait_for(job, two_nodes, timeout=400)
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    first, second = attempts(out)
    m = re.match(r"job=\d+ attempt=1 class=crash exit=\d+ seconds=\d+ first_failure=1@(gpu0[12]) reason=\"Killed\" "
                 r"action=requeue \(1 of 3 restarts\) excluding node (gpu0[12])", first)
    assert m and m[1] == m[2], first
    assert " attempt=2 class=done" in second, second
    assert info["NodeList"] != m[1] and info["ExcNodeList"] == m[1], info   # moved off the failed node
    rank0 = (out / "logs" / "rank-00000.log").read_text()
    assert re.search(r"attempt 2, restarted after: job=\d+ attempt=1 class=crash .*first_failure=1@gpu0", rank0)
    resumed = int(re.search(r"resumed from .*: world size 2 -> 2, \d+ images seen, iteration (\d+) of 24", rank0)[1])
    assert resumed == 8 and 10 - resumed <= 4                                # redone <= the checkpoint period
    recs = records(out)
    assert recs[-1]["iteration"] == 24 and sorted({r["iteration"] for r in recs}) == list(range(2, 25, 2))
    for k in (0, 1):  # every attempt's per-rank output stays
        assert (out / "slurm" / f"attempt-{k}" / "rank-0.out").is_file()


def test_crashes_beyond_max_restarts_fail_with_a_summary(two_nodes, tmp_path):
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], two_nodes, tmp_path,
                 {"OUTPUT_DIR": str(out), "EXTRA": CRASH_RUN, "MAX_RESTARTS": "1",
                  "HVD_MEGDET_FAULT": "rank:0,iter:3,kind:raise,attempt:any"})
    info = wait_for(job, two_nodes, timeout=400)
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    lines = attempts(out)
    assert len(lines) == 2 and all("class=crash" in line and "InjectedFault" in line for line in lines), lines
    assert "excluding" not in lines[0]                    # a Python exception is no node problem
    assert "action=fail (MAX_RESTARTS=1 spent)" in lines[1]
    assert "after 1 restarts: giving up" in log and lines[0] in log, log


def test_failing_rank_fails_the_job(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], cluster, tmp_path,
                 {"OUTPUT_DIR": str(out), "EXTRA": f"data.dataset=coco data.root={tmp_path}/nowhere"})
    info = wait_for(job, cluster, timeout=200)
    log = batch_output(tmp_path, job)
    # a user error: FAILED at once with exit 2, never requeued
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", log
    assert "class=user_error" in (out / "slurm" / "attempts.log").read_text() and "user error on rank" in log
    for r in range(2):
        for f in (out / "slurm" / "attempt-0" / f"rank-{r}.out", out / "logs" / f"rank-{r:05d}.log"):
            text = f.read_text()
            assert f"rank {r}/2: DataError: annotation file not found: {tmp_path}/nowhere" in text, text


def test_128_gpu_template(tmp_path):
    """megdet.sbatch for 16 nodes x 8 GPUs: sbatch --test-only on a pretend 16-node, 8-GPU
    cluster, and the job script's dry run with that allocation's environment."""
    d = tmp_path / "big"
    res = run(["bash", str(LOCAL_SLURM), "start-fake", str(d), "16", "8", "64"], timeout=90)
    assert res.returncode == 0, res.stdout
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    try:
        test_only = subprocess.run(["sbatch", "--test-only", str(REPO / "slurm/megdet.sbatch")], env=env,
                                   capture_output=True, text=True, timeout=60)
    finally:
        run(["bash", str(LOCAL_SLURM), "stop", str(d)], timeout=60)
    msg = test_only.stdout + test_only.stderr
    assert re.search(r"to start at .* using 1024 processors on nodes gpu\[01-16\]", msg), msg
    # the job script itself, as SLURM would run it on that allocation, in dry-run mode
    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "16", "SLURM_NTASKS": "128",
                 "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_NODELIST": "gpu[01-16]",
                 "SLURM_SUBMIT_DIR": str(REPO), "DRY_RUN": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    dry = subprocess.run(["bash", str(REPO / "slurm/megdet.sbatch")], env={**os.environ, **slurm_env},
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "nodes: 16" in dry.stdout and "tasks: 128 (8 per node)" in dry.stdout and "GPUs per node: 8" in dry.stdout
    launch = next(line for line in dry.stdout.splitlines() if line.startswith("launch: "))
    assert launch.startswith("launch: srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=8 --open-mode=append "
                             "--output=")
    assert f"{REPO}/outputs/megdet_r50_fpn-4242/slurm/attempt-0/rank-%t.out" in launch
    assert "scripts/train.py --config megdet_r50_fpn" in launch and "--resume" in launch
    plan = json.loads(next(line for line in dry.stdout.splitlines() if line.startswith("plan "))[5:])
    assert plan["world_size"] == 128 and plan["bn_group_ranks"] == 16 and plan["bn_size_images"] == 32
    assert plan["global_batch"] == 256 and plan["lr"] == pytest.approx(0.32) and plan["bn_groups"] == 8
    assert plan["max_iter"] == 5625 and plan["steps"] == [3750, 5000]
