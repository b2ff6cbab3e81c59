"""Model building in one process: frozen stages, backbone weights by torchvision name."""
import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet import config, model
from hvd_megdet.sync_bn import SyncBatchNorm


def r18(*overrides):
    return config.load("megdet_r50_fpn", ["model.backbone=resnet18", *overrides]).model


def norms(body, prefix):
    return {type(m) for n, m in body.named_modules() if n.startswith(prefix) and
            isinstance(m, (SyncBatchNorm, FrozenBatchNorm2d, torch.nn.BatchNorm2d))}


def test_frozen_stages_use_frozen_batchnorm():
    body = model.build_backbone(r18("model.trainable_layers=3"), bn_group_ranks=16).body
    assert norms(body, "bn1") == norms(body, "layer1") == {FrozenBatchNorm2d}  # not trained: no batch stats
    for stage in ("layer2", "layer3", "layer4"):
        assert norms(body, stage) == {SyncBatchNorm}
    assert not any(p.requires_grad for p in body.layer1.parameters())
    full = model.build_backbone(r18("model.trainable_layers=5"), bn_group_ranks=16).body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in full.modules())


def test_weights_by_torchvision_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = r18("model.backbone_weights=IMAGENET1K_V1", "model.trainable_layers=3")
    path, url = model.backbone_weights_path(cfg)
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth" and url.endswith(path.name)
    # offline: a clear error naming the file to place (the download itself stands in for no network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    model.fetch_backbone_weights(cfg)
    with pytest.raises(model.WeightsError, match=f"{path}.*place {url} there"):
        model.build_backbone(cfg)
    # present in the hub cache: loaded (frozen stages keep the file's statistics)
    ref = torchvision.models.resnet18()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    body = model.build_backbone(cfg).body
    assert torch.equal(body.conv1.weight, ref.conv1.weight)
    assert torch.equal(body.layer1[0].bn1.running_mean, ref.layer1[0].bn1.running_mean)
    assert torch.equal(body.layer4[0].bn1.running_mean, ref.layer4[0].bn1.running_mean)
    with pytest.raises(ValueError, match="no weights for the 'tiny' backbone"):
        model.backbone_weights_path(config.load("shapes_tiny", ["model.backbone_weights=IMAGENET1K_V1"]).model)
    with pytest.raises(ValueError, match="not a torchvision weight"):
        model.backbone_weights_path(r18("model.backbone_weights=IMAGENET1K_V9"))
