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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    res = run(["bash", str(LOCAL_SLURM), "start", str(d)], timeout=90)
    assert res.returncode == 0, res.stdout
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PATH": f"{BIN}:{os.environ['PATH']}",
           "REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        yield env
    finally:
        run(["bash", str(LOCAL_SLURM), "stop", str(d)], timeout=90)


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


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "run"
    extra = ("solver.max_iter=80 solver.steps=[70] solver.warmup_iters=5 train.log_period=2 "
             "train.checkpoint_period=1000 train.eval_images=8 train.num_visualizations=0")
    job = submit([str(REPO / "slurm/smoke.sh")], cluster, tmp_path, {"OUTPUT_DIR": str(out), "EXTRA": extra})
    metrics = out / "metrics.jsonl"
    end = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # past iteration 6
        assert time.time() < end, batch_output(tmp_path, job)
        assert job_info(job, cluster).get("JobState") not in TERMINAL, batch_output(tmp_path, job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--full", job], env=cluster, check=True)
    info = wait_for(job, cluster, timeout=600)  # a requeued job passes through REQUEUED/PENDING
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "requeueing job" in log and "restart 1" in log, log
    rank0 = (out / "logs" / "rank-00000.log").read_text()
    stopped = int(re.search(r"stop requested .* at iteration (\d+)", rank0)[1])
    assert 6 <= stopped < 80
    assert re.search(rf"resumed from .*model_img{8 * stopped:010d}.pth: world size 2 -> 2, {8 * stopped} images "
                     rf"seen, iteration {stopped} of 80", rank0), rank0
    iters = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert iters[-1] == 80 and iters == sorted(iters) and len(iters) == len(set(iters)), iters
    assert (out / "checkpoints" / "model_img0000000640.pth").is_file()


def test_failing_rank_fails_the_job(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit([str(REPO / "slurm/smoke.sh")], cluster, tmp_path,
                 {"OUTPUT_DIR": str(out), "EXTRA": f"data.dataset=coco data.root={tmp_path}/nowhere"})
    info = wait_for(job, cluster, timeout=200)
    log = batch_output(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log
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
