"""Failures on purpose (HVD_MEGDET_FAULT): exit codes, the horovodrun supervisor relaunching a
killed or hung job, checkpoints that hold (a truncated newest one, stale temporaries), and the
classification of an attempt from status files and launcher output."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from hvd_megdet import attempts, faults
from tests.harness import REPO, launcher_env, run

# 64 train / 16 val images of 96 px; 2 ranks x 2 images = 4 per iteration; 16 iterations;
# a checkpoint every 4 iterations (16 images); a rank that makes no progress for 12 s ends.
SMALL = ["data.shapes_train=64", "data.shapes_val=16", "data.shapes_image_size=96", "data.min_size=96",
         "data.max_size=96", "solver.images_per_rank=2", "solver.reference_batch=4", "solver.max_iter=16",
         "solver.steps=[12]", "solver.warmup_iters=2", "train.log_period=2", "train.checkpoint_period=4",
         "train.num_visualizations=0", "train.eval_images=8", "train.stall_minutes=0.2"]


def supervise(tmp_path, controller, fault, extra=(), max_restarts=2, timeout=300):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts/run.py"), "--max-restarts", str(max_restarts), "-np", "2",
           f"--{controller}", "--", "--output-dir", str(out), f"data.root={tmp_path}/shapes", *SMALL, *extra]
    t0 = time.time()
    res = run(cmd, timeout=timeout, env=launcher_env(extra={"HVD_MEGDET_FAULT": fault} if fault else {}))
    summary = [json.loads(line.strip()) for line in res.stdout.splitlines() if line.startswith("   {")]
    return res, summary, out, time.time() - t0


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_supervisor_relaunches_a_killed_rank(tmp_path, controller):
    res, summary, out, _ = supervise(tmp_path, controller, "rank:1,iter:7,kind:kill")
    assert res.returncode == 0, res.stdout
    assert [s["class"] for s in summary] == ["crash", "done"], res.stdout
    rank, host, reason = summary[0]["first_failure"]
    assert rank == 1 and "signal 9" in reason, summary               # named by the launcher's report
    rank0 = (out / "logs" / "rank-00000.log").read_text()
    assert "attempt 2, restarted after: attempt 1 crashed" in rank0 and "rank 1 on" in rank0
    assert re.search(r"resumed from .*model_img0000000016.pth: world size 2 -> 2, 16 images seen, iteration 4", rank0)
    recs = metrics(out)
    assert recs[-1]["iteration"] == 16 and recs[-1]["images"] == 64     # the same length as one uninterrupted run
    assert json.loads((out / "eval" / "metrics.json").read_text())["iteration"] == 16


def test_supervisor_ends_a_hung_job_and_relaunches_it(tmp_path):
    res, summary, out, _ = supervise(tmp_path, "gloo", "rank:1,iter:7,kind:hang")
    assert res.returncode == 0, res.stdout
    assert [s["class"] for s in summary] == ["crash", "done"], res.stdout
    rank, _, reason = summary[0]["first_failure"]
    assert rank == 1 and "this rank is the one that hangs" in reason, summary
    assert "watchdog: no progress" in (out / "logs" / "rank-00001.log").read_text()
    log0 = (out / "logs" / "rank-00000.log").read_text()  # the next attempt's rank 0 names the culprit
    assert re.search(r"restarted after: attempt 1 crashed .*: rank 1 on \S+ failed first: watchdog: .*hangs", log0)
    # bounded: start-up + 7 iterations + the 12 s stall limit + the watchdog's poll, not hours
    assert summary[0]["seconds"] < 60, summary
    assert metrics(out)[-1]["iteration"] == 16


def test_supervisor_stops_at_a_user_error_and_at_its_budget(tmp_path):
    res, summary, _, _ = supervise(tmp_path, "gloo", None, extra=["solver.images_per_rank=0"])
    assert res.returncode == 2 and [s["class"] for s in summary] == ["user_error"], res.stdout
    assert "solver.images_per_rank" in summary[0]["first_failure"][2]
    res, summary, _, _ = supervise(tmp_path, "mpi", "rank:0,iter:3,kind:raise,attempt:any", max_restarts=1)
    assert res.returncode == 1 and [s["class"] for s in summary] == ["crash", "crash"], res.stdout
    assert "InjectedFault" in summary[0]["first_failure"][2] and "giving up after 2 attempts" in res.stdout


def test_truncated_newest_checkpoint_is_skipped_and_temporaries_removed(tmp_path):
    """One process: a crash at iteration 10 leaves checkpoints at 4 and 8 iterations; the newest is
    then truncated and a save's temporary file left behind. --resume names and skips the bad
    file, removes the temporary, resumes from iteration 4 and completes."""
    out = tmp_path / "run"
    argv = [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(out), f"data.root={tmp_path}/shapes",
            *SMALL, "solver.images_per_rank=4", "train.keep_checkpoints=5"]
    res = run(argv, timeout=300, env=launcher_env(extra={"HVD_MEGDET_FAULT": "rank:0,iter:10,kind:raise"}))
    assert res.returncode == 1 and "crash: rank 0/1: InjectedFault" in res.stdout, res.stdout
    ckpts = sorted((out / "checkpoints").glob("model_img*.pth"))
    assert [p.name for p in ckpts] == ["model_img0000000016.pth", "model_img0000000032.pth"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])
    stale = out / "checkpoints" / "model_img0000000048.pth.abc123.tmp"
    stale.write_bytes(b"partial")
    res = run(argv + ["--resume"], timeout=300)
    assert res.returncode == 0, res.stdout
    log = (out / "logs" / "rank-00000.log").read_text()
    assert re.search(r"cannot read checkpoint .*model_img0000000032.pth: .*skipped, trying the previous", log), log
    assert f"removed {stale}" in log and not stale.exists()
    assert re.search(r"resumed from .*model_img0000000016.pth: world size 1 -> 1, 16 images seen, iteration 4", log)
    assert metrics(out)[-1]["images"] == 64


def test_signal_during_start_up_checkpoints_at_the_first_iteration(tmp_path):
    """SIGUSR1 while the process is still importing torch and starting Horovod: not fatal, the
    job checkpoints after its first iteration and exits 75 with the PREEMPTED marker."""
    out = tmp_path / "run"
    argv = [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(out), f"data.root={tmp_path}/shapes",
            *SMALL, "solver.images_per_rank=4"]
    proc = subprocess.Popen(argv, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, stdout
    log = (out / "logs" / "rank-00000.log").read_text()
    assert "training from iteration 0" in log and "stop requested (signal on some rank) at iteration 1" in log
    assert (out / "PREEMPTED").read_text().strip() == "1"
    assert [p.name for p in (out / "checkpoints").glob("*.pth")] == ["model_img0000000004.pth"]


def test_fault_spec():
    assert faults.from_env("rank:1,iter:7,kind:kill") == faults.Fault(1, 7, "kill", 0)
    assert faults.from_env("rank:0,iter:3,kind:hang,attempt:any").attempt is None
    for bad in ("rank:1,kind:kill", "rank:1,iter:2,kind:explode", "rank:1,iter:2,kind:kill,when:now"):
        with pytest.raises(ValueError, match="HVD_MEGDET_FAULT"):
            faults.from_env(bad)


def _status(tmp_path, kind, rank, t, reason):
    (tmp_path / f"{kind}-rank-{rank:05d}.json").write_text(json.dumps(
        {"class": kind, "rank": rank, "host": f"node{rank}", "time": t, "reason": reason}))


def test_classify_attempts(tmp_path):
    c = attempts.classify
    assert c(0, tmp_path)["class"] == "done"
    # a killed task: only the launcher knows, and it is a node problem
    srun = "srun: error: gpu07: task 5: Killed\nsrun: error: gpu01: task 0: Exited with exit code 1\n"
    _status(tmp_path, "crash", 0, 2.0, "HorovodInternalError: peer closed")
    res = c(137, tmp_path, srun)
    assert (res["class"], res["first_rank"], res["first_host"], res["node_problem"]) == ("crash", 5, "gpu07", True)
    # a Python exception reported by the rank itself, before the others: no node problem
    _status(tmp_path, "crash", 3, 1.0, "ValueError: boom")
    res = c(1, tmp_path, "srun: error: gpu01: task 3: Exited with exit code 1\n")
    assert (res["first_rank"], res["first_reason"], res["node_problem"]) == (3, "ValueError: boom", False)
    # mpirun's and horovodrun's reports of a killed rank
    mpirun = "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).\n"
    assert attempts.launcher_first(mpirun) == {"rank": 1, "host": "vm", "reason": "killed by signal 9 (Killed)"}
    gloo = "The first process to do so was:\nProcess name: 1\nExit code: 137\n"
    assert attempts.launcher_first(gloo, ["a", "b"]) == {"rank": 1, "host": "b", "reason": "killed by signal 9"}
    # a user error anywhere wins; a preemption is not a crash
    _status(tmp_path, "user_error", 1, 3.0, "ConfigError: bad key")
    assert c(1, tmp_path)["class"] == "user_error"
    assert c(75, tmp_path / "nothing")["class"] == "preempted"
