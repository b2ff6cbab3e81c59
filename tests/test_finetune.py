"""Fine-tuning from a detector (model.weights): torchvision's COCO_V1 format and name, an
hvd_megdet checkpoint with another number of classes (end to end), and mismatches named."""
import json
import re
import shutil
import sys

import pytest
import torch
import torchvision

from hvd_megdet import config, model
from tests.harness import REPO, horovodrun_cmd, run
from tests.test_train import small


def _megdet(*overrides):
    return config.load("megdet_r50_fpn", list(overrides))


def test_coco_v1_by_name(tmp_path, monkeypatch):
    """COCO_V1 resolves to torch's hub cache; offline, the error names the file to place; present
    (torchvision's own fasterrcnn_resnet50_fpn state dict, 91 classes), everything but the box
    predictor loads into our 3-class model."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = _megdet("model.weights=COCO_V1")
    path, url = model.weights_path(cfg.model, "weights")
    assert path == tmp_path / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    model.fetch_weights(cfg.model, "weights")
    ours = model.build_model(cfg, num_classes=4)
    with pytest.raises(model.WeightsError, match=f"{path}.*place {url} there"):
        model.load_detector_weights(ours, cfg.model)
    torch.manual_seed(1)
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    predictor_before = ours.roi_heads.box_predictor.cls_score.weight.clone()
    line = model.load_detector_weights(ours, cfg.model)
    assert "box predictor re-initialised: the weights have 90 classes, this dataset 3" in line
    theirs, mine = ref.state_dict(), ours.state_dict()
    loaded = [k for k in theirs if k not in model.PREDICTOR_KEYS]
    assert len(loaded) > 250 and all(torch.equal(theirs[k], mine[k]) for k in loaded)
    assert torch.equal(mine["roi_heads.box_predictor.cls_score.weight"], predictor_before)
    with pytest.raises(model.WeightsError, match="no weights for the 'tiny' backbone"):
        model.weights_path(config.load("shapes_tiny", ["model.weights=COCO_V1"]).model, "weights")


def test_mismatch_is_named(tmp_path):
    cfg = config.load("shapes_tiny", [f"model.weights={tmp_path / 'w.pth'}"])
    tiny = model.build_model(cfg, num_classes=4)
    state = tiny.state_dict()
    state["backbone.fpn.inner_blocks.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    state["extra.head.weight"] = torch.zeros(1)
    torch.save({"model": state, "config": {}}, tmp_path / "w.pth")
    with pytest.raises(model.WeightsError, match=r"w.pth does not fit this model: 1 shape mismatch.*inner_blocks.0.0"):
        model.load_detector_weights(tiny, cfg.model)
    del state["backbone.fpn.inner_blocks.0.0.weight"]
    torch.save({"model": state}, tmp_path / "w.pth")
    with pytest.raises(model.WeightsError, match=r"1 missing key.*inner_blocks.0.0.weight.*1 unexpected.*extra.head"):
        model.load_detector_weights(tiny, cfg.model)
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(model.WeightsError, match="cannot read .*w.pth"):
        model.load_detector_weights(tiny, cfg.model)


def _two_class_copy(src, dst):
    """The shapes set with its third category (and its boxes) removed."""
    shutil.copytree(src, dst)
    for split in ("train", "val"):
        f = dst / "annotations" / f"instances_{split}.json"
        d = json.loads(f.read_text())
        d["categories"] = [c for c in d["categories"] if c["id"] != 3]
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 3]
        f.write_text(json.dumps(d))


def _first_record(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_finetune_from_a_checkpoint_with_other_classes(tmp_path):
    """A 3-class shapes run's checkpoint fine-tunes a 2-class run: its weights are taken (log line),
    its first-iteration loss is far below a random-init run's, and it trains."""
    train = [sys.executable, str(REPO / "scripts/train.py")]
    res = run(horovodrun_cmd(2, "mpi", [*train, "--output-dir", str(tmp_path / "A"), *small(tmp_path, iters=60),
                                        "train.num_visualizations=0"]), timeout=400)
    assert res.returncode == 0, res.stdout
    ckpt = tmp_path / "A" / "checkpoints" / "model_img0000000240.pth"
    _two_class_copy(tmp_path / "shapes", tmp_path / "two")
    short = small(tmp_path, iters=4) + [f"data.root={tmp_path / 'two'}", "data.dataset=coco", "train.log_period=1",
                                        "train.num_visualizations=0"]
    first = {}
    for name, extra in (("B", [f"model.weights={ckpt}"]), ("C", [])):
        res = run(horovodrun_cmd(2, "gloo", [*train, "--output-dir", str(tmp_path / name), *short, *extra]),
                  timeout=300)
        assert res.returncode == 0, res.stdout
        first[name] = _first_record(tmp_path / name)
    log = (tmp_path / "B" / "logs" / "rank-00000.log").read_text()
    assert re.search(r"fine-tuning from model.weights=.*model_img0000000240.pth .*box predictor re-initialised: "
                     r"the weights have 3 classes, this dataset 2", log), log
    assert "resumed from" not in log and "iteration 0 to 4" in log          # no progress taken from A
    b, c = first["B"], first["C"]
    rpn = {k: v["loss_objectness"] + v["loss_rpn_box_reg"] for k, v in first.items()}
    assert rpn["B"] < 0.5 * rpn["C"], first                   # backbone, FPN and RPN came trained
    # the whole loss too, although the re-initialised box head now sees many more positive
    # proposals (so a larger box regression term) than a random RPN gives it
    assert b["loss"] < c["loss"], first
    assert json.loads((tmp_path / "B" / "eval" / "metrics.json").read_text())["iteration"] == 4
