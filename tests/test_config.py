"""Config files, overrides and errors that name the key."""
import pytest

from hvd_megdet import config
from hvd_megdet.config import ConfigError


def test_shipped_configs_load():
    assert {"shapes_tiny", "megdet_r50_fpn", "megdet_r50_fpn_long"} <= set(config.available())
    tiny = config.load()
    assert tiny.name == "shapes_tiny" and tiny.data.dataset == "shapes" and tiny.model.norm == "syncbn"
    m = config.load("megdet_r50_fpn")
    assert (m.model.backbone, m.model.bn_size, m.solver.images_per_rank) == ("resnet50", 32, 2)
    assert (m.data.min_size, m.data.max_size, m.solver.momentum, m.solver.weight_decay) == (800, 1333, 0.9, 1e-4)
    long = config.load("megdet_r50_fpn_long")
    assert long.solver.max_iter == 135000 and long.model.bn_size == 32  # inherits from its base


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
    (["model.syncbn_impl=cuda"], "model.syncbn_impl"),
    (["data.hflip_prob=2"], "data.hflip_prob"),
    (["justakey"], "key=value"),
    (["model.bn_size=8", "model.bn_group_size=2"], "not both"),
    (["model.bn_size=6"], "multiple of solver.images_per_rank = 4"),
    (["train.checkpoint_minutes=-1"], "train.checkpoint_minutes"),
    (["solver.amp=true", "solver.fp16_allreduce=true"], "'solver.amp' = True: cannot be combined with "
     "solver.fp16_allreduce=true: .*solver.fp16_allreduce=false, or set solver.amp=false"),
])
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        config.load("shapes_tiny", overrides)


def test_amp_and_fp16_allreduce_each_alone_are_fine():
    assert config.load("shapes_tiny", ["solver.amp=true"]).solver.amp
    assert config.load("shapes_tiny", ["solver.fp16_allreduce=true"]).solver.fp16_allreduce


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


@pytest.mark.parametrize("world, ranks, images, groups, notice", [
    (128, 16, 32, 8, False), (64, 16, 32, 4, False), (16, 16, 32, 1, False),
    (8, 8, 16, 1, True), (1, 1, 2, 1, True),   # fewer ranks than a group needs: the whole world
])
def test_bn_size_in_images(world, ranks, images, groups, notice):
    from hvd_megdet import plan
    bn = plan.resolve(config.load("megdet_r50_fpn"), world).bn
    assert (bn.ranks, bn.images, bn.groups, bool(bn.notice)) == (ranks, images, groups, notice)
    if notice:
        assert f"BN size {images} images" in bn.notice


def test_bn_groups_that_do_not_fit_are_rejected():
    from hvd_megdet import plan
    with pytest.raises(ConfigError, match="model.bn_size=32 is 16 ranks x 2 images, which does not divide the world size 24"):
        plan.resolve(config.load("megdet_r50_fpn"), 24)
    with pytest.raises(ConfigError, match="BN group size 3 does not divide the world size 4"):
        plan.resolve(config.load("shapes_tiny", ["model.bn_group_size=3"]), 4)
    assert plan.resolve(config.load("shapes_tiny"), 3).bn.ranks == 3  # neither set: the whole world


def test_plan_command_prints_groups_periods_and_notice():
    import json
    import subprocess
    import sys
    from tests.harness import REPO
    outs = {}
    for world in (128, 8):
        res = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), "--plan", str(world), "--config",
                              "megdet_r50_fpn"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 0, res.stderr
        outs[world] = res.stdout
    big = json.loads(outs[128].splitlines()[-1][5:])
    assert (big["bn_group_ranks"], big["bn_size_images"], big["bn_groups"]) == (16, 32, 8)
    assert (big["warmup_iters"], big["checkpoint_period_iters"], big["checkpoint_minutes"]) == (469, 313, 30)
    assert "groups of 16 ranks = BN size 32 images" in outs[128] and "NOTICE" not in outs[128]
    assert "checkpoint every 313 iterations and every 30 min" in outs[128]
    small = json.loads(outs[8].splitlines()[-1][5:])
    assert (small["bn_group_ranks"], small["bn_size_images"], small["warmup_iters"]) == (8, 16, 7500)
    assert "NOTICE: model.bn_size=32 needs 16 ranks" in outs[8] and "BN size 16 images" in outs[8]
