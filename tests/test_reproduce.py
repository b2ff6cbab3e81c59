"""scripts/experiments/reproduce_megdet.py --quick end to end (a tiny pretraining generated on first use, two real
tiny training cells from it, one made to diverge, the JSON with backbone and AP curves, the PNG,
resuming), scripts/pretrain_backbone.py's determinism and its weights loaded by the detector through
model.backbone_weights, and the full grid's design (axes, seeds, schedule, cost) without running it."""
import importlib.util
import json
import sys
import time

import pytest
import torch

from tests.harness import REPO, horovodrun_cmd, launcher_env, run

EXPERIMENTS = REPO / "scripts" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # their shared module, as when run from the command line
spec = importlib.util.spec_from_file_location("reproduce_megdet", EXPERIMENTS / "reproduce_megdet.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)
pretrain = reproduce.pretrain


def test_divergence_detection():
    ok = [{"loss": v} for v in (2.1, 1.5, 1.0, 0.8)]
    assert not reproduce.diverged(ok, crashed_nonfinite=False)
    assert reproduce.diverged(ok, crashed_nonfinite=True)                    # stopped on a non-finite loss
    assert reproduce.diverged(ok + [{"loss": 7.0}], crashed_nonfinite=False)  # blew up past 3x the start
    assert reproduce.diverged(ok + [{"loss": float("nan")}], crashed_nonfinite=False)


def test_pretraining_data():
    """The generated classification images: deterministic for a generator seed, normalised as the
    detector's inputs, every class drawn, different seeds give different images."""
    x, y = pretrain.make_batch(torch.Generator().manual_seed(3), 400, 32)
    x2, y2 = pretrain.make_batch(torch.Generator().manual_seed(3), 400, 32)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (400, 3, 32, 32)
    assert not torch.equal(x, pretrain.make_batch(torch.Generator().manual_seed(4), 400, 32)[0])
    assert set(y.tolist()) == set(range(len(pretrain.CLASSES))) and torch.bincount(y).min() > 20
    pixels = x * torch.tensor(pretrain.IMAGE_STD).view(1, 3, 1, 1) + torch.tensor(pretrain.IMAGE_MEAN).view(1, 3, 1, 1)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5 and pixels.std() > 0.1


def test_grid_design():
    """The issue's axes, seeds and schedule; the cost model: the single-seed grid under 2 hours, each seed
    more costs its six rate cells."""
    cells, recipe = reproduce.grid(), {**reproduce.DEFAULTS}
    by = {c["name"]: c for c in cells}
    assert len(by) == len(cells)
    batches = lambda group, **kw: sorted(c["mini_batch"] for c in cells if c["group"] == group and c["seed"] == 42
                                         and all(c[k] == v for k, v in kw.items()))
    assert batches("cgbn") == [4, 8, 16, 32]                                  # (a) an 8x range
    assert batches("frozen", lr_scale=1.0) == [4, 8, 16, 32] and batches("frozen", lr_scale=0.5) == [16, 32]  # (b)
    assert by["cgbn_b32_nowarmup"]["warmup"] is False                          # (c)
    sizes = sorted(c["bn_size"] for c in cells if c["group"] == "bnsize" and c["seed"] == 42) + [32]  # + cgbn_b32
    assert sizes[0] <= 2 and sizes[-1] >= 16 and len(sizes) >= 4                # (d)
    assert all(c["mini_batch"] == 32 for c in cells if c["group"] == "bnsize")
    assert by["bnsize_b32_bn2"]["images_per_rank"] == 2 and by["bnsize_b32_bn2"]["bn_group_ranks"] == 1
    seeds_of = lambda name, grid_cells: {c["seed"] for c in grid_cells if reproduce.base_name(c["name"]) == name}
    assert seeds_of("cgbn_b8", cells) == set(reproduce.SEEDS) == {42, 1, 2}      # (e) the baseline: 3 seeds
    for name in ("bnsize_b32_bn2", "bnsize_b32_bn4", "bnsize_b32_bn8", "frozen_b32", "cgbn_b32_nowarmup", "cgbn_b32"):
        assert seeds_of(name, cells) == {42, *range(1, 8)}                        # rates: >= 8 seeds each
        assert seeds_of(name, reproduce.grid(seeds=3)) == {42, 1, 2}
        assert by[name]["mini_batch"] == 32
    assert seeds_of("bnsize_b32_bn16", cells) == {42} and seeds_of("cgbn_b4", cells) == {42}
    # seed-major: every rate cell's seed s runs before any seed s + 1 (a partial grid stays balanced)
    order = [c["seed"] for c in cells if c["seed"] != 42]
    assert order == sorted(order, key=lambda s: (s > 2, s)) and cells[-1]["seed"] == 7
    for c in cells:  # a seed cell is its seed-42 cell with another seed (the same key otherwise)
        first = by[reproduce.base_name(c["name"])]
        assert {k: v for k, v in c.items() if k not in ("name", "seed")} == \
            {k: v for k, v in first.items() if k not in ("name", "seed")}
    assert recipe["images"] // 32 >= 300                                        # >= 300 updates at the largest
    for c in cells:  # the same schedule in images for every cell: only the batch, norm, lr scale differ
        ov = dict(o.split("=", 1) for o in reproduce.overrides(c, recipe, "/w.pth"))
        assert ov["solver.max_iter"] == str(recipe["images"] // 8) and ov["solver.steps"] == "[800,1067]"
        assert ov["solver.warmup_iters"] == ("120" if c["warmup"] else "0")
        assert float(ov["solver.base_lr"]) == pytest.approx(0.01 * c["lr_scale"])
        assert ov["model.backbone_weights"] == "/w.pth" and ov["model.norm"] == c["norm"]
    cost = lambda n: sum(reproduce.estimate_s(c, recipe) for c in reproduce.grid(seeds=n))
    assert 1.4 * 3600 < cost(1) < 2.0 * 3600, cost(1)              # one seed per cell + the baseline's 3
    assert cost(8) - cost(7) == pytest.approx(sum(reproduce.estimate_s(by[n], recipe) for n in reproduce.RATE_CELLS))


def test_divergence_rates():
    """Wilson intervals against hand-computed values; where a divergent run blew up; rates, and AP
    over the converged runs only."""
    assert reproduce.wilson(0, 8) == pytest.approx((0.0, 0.3244), abs=1e-4)   # 3.84 / 11.84
    assert reproduce.wilson(8, 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert reproduce.wilson(2, 8) == pytest.approx((0.0715, 0.5907), abs=1e-4)
    recs = [{"iteration": i, "images": 32 * i, "lr": 0.001 * i, "loss": v}
            for i, v in enumerate((2.0, 1.5, 1.2, 4.9, 8.6, float("inf")), start=1)]
    assert reproduce.blowup(recs, "", None) == {"iteration": 5, "images": 160, "lr": 0.005, "loss": 8.6}
    assert reproduce.blowup(recs[:3], "", None) is None
    from hvd_megdet import config, plan
    sched = plan.resolve(config.load("shapes_tiny", ["solver.images_per_rank=4"]), 8).schedule
    got = reproduce.blowup(recs[:3], "NonFiniteLoss: non-finite loss at iteration 29 on rank(s) [0]", sched)
    assert got == {"iteration": 29, "images": 29 * 32, "lr": sched.lr_at(29 * 32), "loss": None}

    def run(seed, ap, div):
        return {"name": "bn2" if seed == 42 else f"bn2_seed{seed}", "seed": seed, "AP": ap, "diverged": div,
                "blowup": {"iteration": 17, "lr": 0.021} if div else None}
    (agg,) = reproduce.aggregates([run(42, 0.5, False), run(1, 0.4, False), run(7, 0.0, True)])
    assert agg["runs"] == 3 and agg["diverged"] == 1 and agg["divergence_rate"] == pytest.approx(1 / 3)
    assert agg["divergence_ci95"] == pytest.approx(list(reproduce.wilson(1, 3)))
    assert agg["AP_mean"] == pytest.approx(0.45) and agg["AP_spread"] == pytest.approx(0.1)  # not the 0.0
    assert agg["blowups"] == [{"seed": 7, "iteration": 17, "lr": 0.021}]


def test_plotted_points_follow_the_first_seed():
    """The plotted line is the first seed's AP in every cell (paired: the same data order and head
    initialisation); the bar spans all seeds; seed spreads are max - min."""
    def c(name, bn, seed, ap):
        return {"name": name, "group": "bnsize", "mini_batch": 32, "bn_size": bn, "seed": seed, "AP": ap,
                "diverged": False}
    cells = [c("bn2", 2, 42, 0.52), c("bn2_seed1", 2, 1, 0.47), c("bn2_seed2", 2, 2, 0.48), c("bn4", 4, 42, 0.50)]
    assert reproduce.points(cells, "bnsize", "bn_size", mini_batch=32) == [
        (2, 0.52, 0.47, 0.52, 3, False), (4, 0.50, 0.50, 0.50, 1, False)]
    (agg,) = reproduce.aggregates(cells)
    assert agg["cell"] == "bn2" and agg["AP_spread"] == pytest.approx(0.05) and agg["AP_mean"] == pytest.approx(0.49)


def test_other_recipe_never_overwrites_the_grid(capsys):
    """A diagnostic recipe must be saved under its own name; the grid's own recipe needs none."""
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--images", "38400", "--cells", "cgbn_b32"])
    assert "--save-as" in capsys.readouterr().err
    assert reproduce.parse_args(["--images", "38400", "--save-as", "megdet_longer"]).save_as == "megdet_longer"
    assert reproduce.parse_args(["--cells", "cgbn_b32"]).save_as is None
    assert reproduce.parse_args(["--seeds", "3"]).seeds == 3
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--seeds", "0"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--images", "38400", "--save-as", "../megdet_miniature"])


@pytest.fixture(scope="module")
def quick_grid(tmp_path_factory):
    """One --quick run with an empty cache: the backbone is pretrained first, under horovodrun."""
    out, cache = tmp_path_factory.mktemp("quick"), tmp_path_factory.mktemp("cache")
    env = launcher_env(extra={"HVD_MEGDET_CACHE": str(cache)})
    cmd = [sys.executable, str(EXPERIMENTS / "reproduce_megdet.py"), "--quick", "--output-dir", str(out)]
    res = run(cmd, timeout=600, env=env)
    assert res.returncode == 0, res.stdout
    assert "pretraining the backbone" in res.stdout
    return out, cache, cmd, env


def test_quick_grid(quick_grid):
    out, cache, cmd, env = quick_grid
    summary = json.loads((out / "megdet_miniature.json").read_text())
    backbone = summary["backbone"]
    assert backbone["path"] == str(cache / pretrain.QUICK.key(2) / pretrain.WEIGHTS_FILE)
    assert 0 <= backbone["heldout_accuracy"] <= 1 and backbone["world_size"] == 2
    trained, blown = summary["cells"]
    for c in (trained, blown):
        assert {"name", "ranks", "images_per_rank", "mini_batch", "bn_size", "lr", "warmup_images", "iterations",
                "AP", "AP50", "diverged", "wall_s", "norm", "ap_curve", "eval_period_images"} <= set(c)
        assert c["images"] == summary["recipe"]["images"] == 160
        assert c["backbone_weights"] == backbone["path"]
        assert f"model.backbone_weights={backbone['path']}" in c["overrides"]
        assert c["backbone_heldout_accuracy"] == backbone["heldout_accuracy"]
    assert trained["diverged"] is False and trained["iterations"] == 160 // 4 and trained["exit"] == 0
    assert trained["bn_size"] == 4 and trained["lr"] == pytest.approx(reproduce.DEFAULTS["base_lr"] * 4 / 8)
    # periodic evaluation: at 80 images and at the end, the last one being the cell's AP
    assert [p[0] for p in trained["ap_curve"]] == [80, 160]
    assert trained["ap_curve"][-1][1] == pytest.approx(trained["AP"], abs=1e-4)
    records = [json.loads(line) for line in (out / trained["name"] / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["images"] == 160 and records[-1]["loss_objectness"] < records[0]["loss_objectness"]  # it learned
    log = (out / trained["name"] / "logs" / "rank-00000.log").read_text(errors="replace")
    assert "model: Faster R-CNN" in log and "SyncBatchNorm" in log
    assert blown["diverged"] is True and blown["exit"] != 0 and blown["AP"] == 0.0 and blown["norm"] == "frozen"
    png = (out / "megdet_miniature.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # resumable: finished cells and the cached backbone are reused
    t0 = time.time()
    res = run(cmd, timeout=120, env=env)
    assert res.returncode == 0 and time.time() - t0 < 40, res.stdout
    assert "reusing" in res.stdout and res.stdout.count("skipped") == 2, res.stdout
    again = json.loads((out / "megdet_miniature.json").read_text())["cells"]
    assert [c["AP"] for c in again] == [trained["AP"], blown["AP"]]


def test_pretraining_deterministic_and_loads(quick_grid, tmp_path):
    """A second quick pretraining into a fresh cache gives the same bytes; the file loads into the
    detector through model.backbone_weights (frozen BN takes its running statistics)."""
    from hvd_megdet import config
    from hvd_megdet.model import WeightsError, build_model

    _, cache, _, _ = quick_grid
    first = cache / pretrain.QUICK.key(2) / pretrain.WEIGHTS_FILE
    res = run(horovodrun_cmd(2, "mpi", [sys.executable, str(REPO / "scripts/pretrain_backbone.py"), "--quick"]),
              timeout=300, env=launcher_env(extra={"HVD_MEGDET_CACHE": str(tmp_path)}))
    assert res.returncode == 0, res.stdout
    second = tmp_path / pretrain.QUICK.key(2) / pretrain.WEIGHTS_FILE
    # the same tensors, bit for bit (torch.save's files differ by a random serialization id)
    state = torch.load(second, weights_only=True)
    assert pretrain.state_digest(state) == pretrain.state_digest(torch.load(first, weights_only=True))
    info, info1 = (json.loads((w.parent / pretrain.INFO_FILE).read_text()) for w in (second, first))
    assert info["digest"] == pretrain.state_digest(state) == info1["digest"]
    assert info["heldout_accuracy"] == info1["heldout_accuracy"]
    assert any(k.startswith("fc.") for k in state) and "bn1.running_var" in state
    assert not torch.allclose(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))  # statistics kept
    for norm in ("frozen", "syncbn"):
        cfg = config.load("shapes_tiny", [f"model.backbone_weights={second}", f"model.norm={norm}"])
        body = build_model(cfg, num_classes=4).backbone.body
        assert torch.equal(body.conv1.weight, state["conv1.weight"])
        assert torch.equal(body.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])
        assert torch.equal(body.bn1.running_mean, state["bn1.running_mean"])
        assert torch.equal(body.layer3[0].bn2.weight, state["layer3.0.bn2.weight"])
    del state["layer2.0.bn1.running_mean"]  # every tensor must be taken: a file that lacks one is refused
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="layer2.0.bn1.running_mean"):
        build_model(config.load("shapes_tiny", [f"model.backbone_weights={tmp_path / 'partial.pth'}"]), num_classes=4)


def test_bn_noise_statistic():
    """scripts/experiments/bn_noise.py's r against the construction: x = a_image + e with sd(a) = 0.6, sd(e) = 0.8,
    so r = 0.6 / sqrt(0.6^2 + 0.8^2) = 0.6 in channel 0; channel 1 has no between-image part."""
    spec = importlib.util.spec_from_file_location("bn_noise", EXPERIMENTS / "bn_noise.py")
    bn_noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bn_noise)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 1, 1, 1, generator=g, dtype=torch.float64) * torch.tensor([0.6, 0.0]).view(1, 2, 1, 1)
    x = 5.0 + a + 0.8 * torch.randn(4000, 2, 8, 8, generator=g, dtype=torch.float64)
    r = bn_noise.between_image_share(x.mean((2, 3)), (x * x).mean((2, 3)))
    assert r[0] == pytest.approx(0.6, abs=0.02)
    assert r[1] == pytest.approx(0.8 / 8 / 0.8, abs=0.02)  # only the noise of a mean over 64 positions
    with pytest.raises(SystemExit):
        bn_noise.main(["--images", "1"])
