"""scripts/gpu_check.sh --rehearse: every step of the GPU check, on this CPU machine with tiny sizes,
into the same gpu.json the GPU machine writes; so the script's own bugs are found here, not in
the few minutes a GPU machine is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("install facts syncbn allreduce_latency shapes_tiny shapes_tiny_amp shapes_tiny_amp_clip "
         "shapes_tiny_resume shapes_tiny_eval_only megdet_syncbn_fp32 megdet_syncbn_amp megdet_bn_fp32 "
         "megdet_bn_amp torchvision_peer_fp32 torchvision_peer_amp").split()


@pytest.mark.timeout(600)
def test_rehearsal_runs_every_step_ok(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("OUT", None)
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=590)
    doc = json.loads((out / "gpu.json").read_text())
    steps = doc["steps"]
    assert doc["mode"] == "rehearse" and doc["steps_planned"].split() == STEPS
    assert list(steps) == STEPS, res.stdout + res.stderr
    bad = {name: s["error"] for name, s in steps.items() if not s["ok"]}
    assert not bad, f"steps not ok: {json.dumps(bad, indent=1)}\n{res.stdout}"
    assert res.returncode == 0 and "total_s" in doc, res.stdout + res.stderr
    f = {name: s["figures"] for name, s in steps.items()}

    assert "-nompi" in f["install"]["cache_key"]  # the GPU machine's build: Gloo + NCCL, no MPI
    assert f["facts"]["controller"] == "gloo" and f["facts"]["size"] == 1
    for dtype in ("fp32", "fp16", "bf16"):  # the forced group path agrees with nn.BatchNorm2d
        assert "error" not in f["syncbn"][dtype], f["syncbn"][dtype]
    assert f["syncbn"]["fp32"]["max_abs_err_y"] < 1e-4 and f["syncbn"]["fp32"]["max_abs_err_dx"] < 1e-3
    assert f["allreduce_latency"]["C256"]["values"] == 513 and f["allreduce_latency"]["C256"]["idle_ms"] > 0
    for name in ("shapes_tiny", "shapes_tiny_amp", "shapes_tiny_amp_clip"):
        assert f[name]["iterations"] == 4 and f[name]["checkpoints"] and "AP" in f[name]["eval"], f[name]
    assert f["shapes_tiny_resume"]["iterations"] == 6 and f["shapes_tiny_resume"]["resumed"]
    assert f["shapes_tiny_eval_only"]["loaded"] and f["shapes_tiny_eval_only"]["eval"]["iteration"] == 6
    for name in ("megdet_syncbn_fp32", "megdet_syncbn_amp", "megdet_bn_fp32", "megdet_bn_amp"):
        assert f[name]["iterations"] == 2 and f[name]["norm"] == name.split("_")[1], f[name]
    for name in ("torchvision_peer_fp32", "torchvision_peer_amp"):
        assert f[name]["iterations"] == 2 and f[name]["s_per_iter"] > 0
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/install.log" in names and "shapes_tiny/logs/rank-00000.log" in names
