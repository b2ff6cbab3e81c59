"""train.timeline: Horovod's timeline of a real 2-rank training job, in the output folder, holding
the named SyncBN and gradient allreduces; and how its path is resolved."""
import json
import sys
from pathlib import Path

from hvd_megdet import app, config
from tests.harness import REPO, horovodrun_cmd, run


def load_timeline(path: Path) -> list[dict]:
    """Horovod's timeline: a Chrome trace (JSON array of events). A job that did not shut Horovod
    down (a crash, os._exit) leaves it without its closing bracket, which viewers accept."""
    text = path.read_text().rstrip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def test_load_timeline_of_a_job_that_did_not_shut_down(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('[\n{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "allreduce.x"}},\n'
                 '{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 5, "pid": 1},')
    assert [e["ph"] for e in load_timeline(f)] == ["M", "B"]


def test_timeline_path_is_in_the_output_dir_unless_absolute(tmp_path):
    rel = config.load("shapes_tiny", ["train.timeline=tl/timeline.json"])
    assert app.horovod_timeline(rel, str(tmp_path / "out")) == str(tmp_path / "out" / "tl" / "timeline.json")
    assert (tmp_path / "out" / "tl").is_dir()  # Horovod opens the file inside hvd.init: its folder exists
    absolute = config.load("shapes_tiny", [f"train.timeline={tmp_path}/elsewhere/t.json"])
    assert app.horovod_timeline(absolute, str(tmp_path / "out")) == f"{tmp_path}/elsewhere/t.json"
    assert app.horovod_timeline(config.load("shapes_tiny"), str(tmp_path / "out")) == ""  # off by default


def test_two_rank_training_writes_the_timeline(tmp_path):
    out = tmp_path / "out"
    args = [f"data.root={tmp_path}/shapes", "data.shapes_train=32", "data.shapes_val=8",
            "data.shapes_image_size=96", "data.min_size=96", "data.max_size=96", "solver.images_per_rank=2",
            "solver.reference_batch=4", "solver.max_iter=4", "solver.steps=[3]", "solver.warmup_iters=1",
            "train.log_period=2", "train.checkpoint_period=1000", "train.num_visualizations=0",
            "train.eval_images=4", "train.timeline=timeline.json"]
    cmd = horovodrun_cmd(2, "mpi", [sys.executable, str(REPO / "scripts/train.py"), "--output-dir", str(out), *args])
    res = run(cmd, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert [p.name for p in tmp_path.glob("*.json")] == []      # not in the working directory
    events = load_timeline(out / "timeline.json")
    names = {e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e.get("args", {})}
    phases = {e["name"] for e in events if e.get("ph") == "B"}
    # every tensor is a "process" row, named <op>.<name>: SyncBN's two per layer, the gradients by parameter
    assert {"allreduce.syncbn.0.fwd", "allreduce.syncbn.0.bwd"} <= names, sorted(names)
    assert any(n.startswith("allreduce.backbone.body.") and n.endswith(".weight") for n in names), sorted(names)
    assert "allreduce.roi_heads.box_predictor.cls_score.weight" in names and "allreduce.iteration_status" in names
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE", "MPI_ALLREDUCE", "MEMCPY_IN_FUSION_BUFFER"} <= phases, phases
    assert not any(e.get("name") == "CYCLE_START" for e in events)  # HOROVOD_TIMELINE_MARK_CYCLES stays off
