"""scripts/reproduce_megdet.py --quick end to end: two real tiny training cells (one made to
diverge), the JSON, the PNG, divergence detection and resuming a finished grid."""
import importlib.util
import json
import sys
import time

from tests.harness import REPO, launcher_env, run

spec = importlib.util.spec_from_file_location("reproduce_megdet", REPO / "scripts/reproduce_megdet.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_divergence_detection():
    ok = [{"loss": v} for v in (2.1, 1.5, 1.0, 0.8)]
    assert not reproduce.diverged(ok, crashed_nonfinite=False)
    assert reproduce.diverged(ok, crashed_nonfinite=True)                    # stopped on a non-finite loss
    assert reproduce.diverged(ok + [{"loss": 7.0}], crashed_nonfinite=False)  # blew up past 3x the start
    assert reproduce.diverged(ok + [{"loss": float("nan")}], crashed_nonfinite=False)


def test_quick_grid(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts/reproduce_megdet.py"), "--quick", "--output-dir", str(tmp_path)]
    res = run(cmd, timeout=400, env=launcher_env())
    assert res.returncode == 0, res.stdout
    summary = json.loads((tmp_path / "megdet_miniature.json").read_text())
    trained, blown = summary["cells"]
    for c in (trained, blown):
        assert {"name", "ranks", "images_per_rank", "mini_batch", "bn_size", "lr", "warmup", "iterations", "AP",
                "AP50", "diverged", "wall_s", "norm"} <= set(c)
        assert c["images"] == summary["images_per_cell"] == 160
    assert trained["diverged"] is False and trained["iterations"] == 160 // 4 and trained["exit"] == 0
    assert trained["bn_size"] == 4 and trained["lr"] == reproduce.BASE_LR * 4 / 8
    curve = trained["loss_curve"]
    assert curve[-1][0] == 160 and curve[-1][1] < curve[0][1]          # it trained: the loss fell
    assert blown["diverged"] is True and blown["exit"] != 0 and blown["AP"] == 0.0
    png = (tmp_path / "megdet_miniature.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # resumable: finished cells are skipped
    t0 = time.time()
    res = run(cmd, timeout=120, env=launcher_env())
    assert res.returncode == 0 and time.time() - t0 < 30, res.stdout
    again = json.loads((tmp_path / "megdet_miniature.json").read_text())["cells"]
    assert [c["AP"] for c in again] == [trained["AP"], blown["AP"]]
