"""Config files, overrides and errors that name the key."""
import pytest

from hvd_megdet import config
from hvd_megdet.config import ConfigError


def test_shipped_configs_load():
    assert {"shapes_tiny", "megdet_r50_fpn", "megdet_r50_fpn_long"} <= set(config.available())
    tiny = config.load()
    assert tiny.name == "shapes_tiny" and tiny.data.dataset == "shapes" and tiny.model.norm == "syncbn"
    m = config.load("megdet_r50_fpn")
    assert (m.model.backbone, m.model.bn_group_size, m.solver.images_per_rank) == ("resnet50", 16, 2)
    assert (m.data.min_size, m.data.max_size, m.solver.momentum, m.solver.weight_decay) == (800, 1333, 0.9, 1e-4)
    long = config.load("megdet_r50_fpn_long")
    assert long.solver.max_iter == 135000 and long.model.bn_group_size == 16  # inherits from its base


def test_overrides_and_roundtrip(tmp_path):
    cfg = config.load("shapes_tiny", ["solver.base_lr=0.05", "model.tiny_widths=[8,16,32,64]", "data.workers=3"])
    assert cfg.solver.base_lr == 0.05 and cfg.model.tiny_widths == [8, 16, 32, 64] and cfg.data.workers == 3
    path = tmp_path / "mine.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(str(path)) == cfg
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, needle", [
    (["solver.bogus=1"], "solver.bogus"),
    (["nope=1"], "nope"),
    (["solver.max_iter=abc"], "solver.max_iter"),
    (["solver.base_lr=-1"], "solver.base_lr"),
    (["solver.steps=[900,100]", "solver.max_iter=1000"], "solver.steps"),
    (["model.norm=groupnorm"], "model.norm"),
    (["data.hflip_prob=2"], "data.hflip_prob"),
    (["justakey"], "key=value"),
])
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        config.load("shapes_tiny", overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nosuch'"):
        config.load("nosuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: {max_iter: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("solver:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match="base_lrr"):
        config.load(str(typo))
