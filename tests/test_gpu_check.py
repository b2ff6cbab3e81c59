"""scripts/gpu_check.sh --rehearse: every step of the GPU check, on this CPU machine with tiny sizes,
into the same gpu.json a GPU node writes; so the script's own bugs are found here, not in the few
minutes a GPU node is lent. And its budget: the plan fits the deadline, a step that cannot finish
does not start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = "deps facts kernels peer install syncbn megdet megdet_sync shapes_tiny".split()


def gpu_check(tmp_path, *args, timeout=590):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("OUT", None)
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse", "--out", str(out), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return res, json.loads((out / "gpu.json").read_text()), out


@pytest.mark.timeout(600)
def test_rehearsal_runs_every_step_ok(tmp_path):
    res, doc, out = gpu_check(tmp_path)
    steps = doc["steps"]
    assert doc["mode"] == "rehearse" and doc["steps_planned"].split() == STEPS
    assert list(steps) == STEPS, res.stdout + res.stderr
    bad = {name: s["error"] for name, s in steps.items() if not s["ok"]}
    assert not bad, f"steps not ok: {json.dumps(bad, indent=1)}\n{res.stdout}"
    assert res.returncode == 0 and "total_s" in doc, res.stdout + res.stderr
    plan = {p.split(":")[0]: (int(p.split(":")[1]), int(p.split(":")[2])) for p in doc["plan"].split()}
    assert list(plan) == STEPS and sum(limit for _, limit in plan.values()) <= doc["deadline_s"] == 540
    assert doc["limit_scale"] == 4  # the rehearsal's limits: x4 (this CPU's tiny steps outlast a GPU's)
    assert all(expected < limit for expected, limit in plan.values())
    f = {name: s["figures"] for name, s in steps.items()}

    assert "need CUDA" in f["kernels"]["skipped"]
    assert "-nompi" in f["install"]["cache_key"]  # the node's build: Gloo + NCCL, no MPI
    assert f["facts"]["controller"] == "gloo" and f["facts"]["size"] == 1
    sb = f["syncbn"]
    assert sb["kinds"] == ["bn", "plain"] and "need CUDA" in sb["fused"] and sb["input"] == "2x3x64x96"
    for dtype in ("fp32", "fp16", "bf16"):  # the forced group path agrees with nn.BatchNorm2d
        assert "error" not in sb[dtype], sb[dtype]
    assert sb["fp32"]["plain_max_abs_err_y"] < 1e-4 and sb["fp32"]["plain_max_abs_err_dx"] < 1e-3
    for step, async_completion in (("megdet", None), ("megdet_sync", "0")):
        m = f[step]
        assert m["latency"]["C256"]["values"] == 513 and m["latency"]["C256"]["idle_ms"] > 0
        assert m["latency"]["async_completion"] == async_completion  # set for CUDA jobs only; here, CPU
        v = m["variants"]["syncbn_plain"]
        # the SyncBN group path ran at world size 1: two real collectives per BN layer per iteration
        assert v["iterations"] == 4 and v["syncbn_layers"] > 50, v
        assert v["syncbn_collectives_per_iter"] == 2 * v["syncbn_layers"], v
        assert v["image"] == "64x96" and v["timed_iterations"] >= 2
    for name in ("bn", "frozen"):
        v = f["megdet"]["variants"][name]
        assert v["iterations"] == 4 and v["norm"] == name and v["syncbn_collectives"] == 0, v
    assert f["peer"]["image"] == "64x96" and f["peer"]["fp32"]["s_per_iter"] > 0
    assert f["peer"]["amp"]["amp"] is False  # AMP on CUDA only
    st = f["shapes_tiny"]
    assert st["train"]["iterations"] == 4 and st["train"]["checkpoints"] and "AP" in st["train"]["eval"], st
    assert st["resume"]["iterations"] == 6 and st["resume"]["resumed"]
    assert st["eval_only"]["loaded"] and st["eval_only"]["eval"]["iteration"] == 6
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/install.log" in names and "shapes_tiny/logs/rank-00000.log" in names
    assert "megdet/syncbn_plain/logs/rank-00000.log" in names


def test_no_step_starts_that_cannot_finish(tmp_path):
    """--deadline 30 (x4 in a rehearsal): deps (limit 20 x4) fits, the peer (65 x4) does not: skipped, with why."""
    res, doc, _ = gpu_check(tmp_path, "--deadline", "30", "--only", "deps,peer", timeout=120)
    steps = doc["steps"]
    assert steps["deps"]["ok"], res.stdout + res.stderr
    assert steps["peer"]["status"] == "skipped" and "exceeds what is left" in steps["peer"]["error"]
