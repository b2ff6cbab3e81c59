"""The LR policy against hand-computed sequences: scaling, warmup, steps, periods, and a resume
on another world size continuing at the same image count."""
import pytest

from hvd_megdet import config
from hvd_megdet.config import SolverConfig
from hvd_megdet.lr_schedule import Schedule


def test_megdet_at_128_ranks():
    s = Schedule.from_config(config.load("megdet_r50_fpn").solver, world_size=128)
    assert s.global_batch == 256
    assert s.lr == pytest.approx(0.32)                  # 0.02 x 256 / 16
    assert s.max_iter == 5625 and s.steps == (3750, 5000)  # 90k, 60k, 80k x 16/256
    # warmup: 7500 iterations at 16 images = 120000 images = 468.75 iterations of 256
    assert s.warmup_images == 120_000 and s.warmup_iters == 469
    assert s.lr_at(0) == pytest.approx(0.32 * 0.001)
    assert s.lr_at(60_000) == pytest.approx(0.32 * (0.001 * 0.5 + 0.5))
    assert s.lr_at(119_744) == pytest.approx(0.32 * (0.001 * 256 / 120_000 + 119_744 / 120_000))
    assert s.lr_at(120_000) == pytest.approx(0.32)
    assert s.lr_at(3749 * 256) == pytest.approx(0.32)
    assert s.lr_at(3750 * 256) == pytest.approx(0.032)
    assert s.lr_at(5000 * 256) == pytest.approx(0.0032)


@pytest.mark.parametrize("world, lr, max_iter, steps, warmup", [
    (8, 0.02, 90000, (60000, 80000), 7500),     # the paper's baseline: 16 images on 8 GPUs
    (16, 0.04, 45000, (30000, 40000), 3750),
    (32, 0.08, 22500, (15000, 20000), 1875),
    (64, 0.16, 11250, (7500, 10000), 938),
])
def test_linear_scaling_follows_world_size(world, lr, max_iter, steps, warmup):
    s = Schedule.from_config(config.load("megdet_r50_fpn").solver, world_size=world)
    assert (s.lr, s.max_iter, s.steps, s.warmup_iters) == (pytest.approx(lr), max_iter, steps, warmup)


def test_full_sequence_small():
    solver = SolverConfig(images_per_rank=2, base_lr=0.1, reference_batch=4, scale_schedule=False,
                          max_iter=10, steps=[6, 8], gamma=0.5, warmup_iters=4, warmup_factor=0.2)
    s = Schedule.from_config(solver, world_size=2)
    expected = [0.1 * 0.2, 0.1 * (0.2 * 0.75 + 0.25), 0.1 * (0.2 * 0.5 + 0.5), 0.1 * (0.2 * 0.25 + 0.75),
                0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert s.global_batch == 4 and s.max_iter == 10
    assert [s.lr_at(4 * i) for i in range(10)] == pytest.approx(expected)


# Given at reference batch 4: 10 iterations = 40 images, steps at 24 and 32 images, warmup 16 images.
RESIZABLE = SolverConfig(images_per_rank=2, base_lr=0.1, reference_batch=4, max_iter=10, steps=[6, 8],
                         gamma=0.5, warmup_iters=4, warmup_factor=0.2)


@pytest.mark.parametrize("world, resume_at, expected", [
    # written at 2 ranks (4 images/iter) after 20 images; resumed on 1 rank: peak lr 0.05, 2 images/iter
    (1, 20, [0.05, 0.05, 0.025, 0.025, 0.025, 0.025, 0.0125, 0.0125, 0.0125, 0.0125]),
    # ... on 4 ranks: peak lr 0.2, 8 images/iter; 3 iterations (20 -> 44 images: within one batch of 40)
    (4, 20, [0.2, 0.1, 0.05]),
    # inside the warmup: at 8 of 16 warmup images, alpha = 0.5
    (4, 8, [0.2 * (0.2 * 0.5 + 0.5), 0.2, 0.1, 0.05]),
])
def test_resume_on_another_world_size_continues_at_the_image_count(world, resume_at, expected):
    s = Schedule.from_config(RESIZABLE, world_size=world)
    images = list(range(resume_at, s.total_images, s.global_batch))
    assert s.total_images == 40 and len(images) == len(expected)
    assert [s.lr_at(i) for i in images] == pytest.approx(expected)
    assert images[-1] + s.global_batch - s.total_images < s.global_batch


def test_periods_are_given_at_the_reference_batch():
    from hvd_megdet import plan
    cfg = config.load("megdet_r50_fpn", ["train.eval_period=10000"])
    p = plan.resolve(cfg, 128)
    assert p.checkpoint_period_images == 5000 * 16 and p.schedule.iters(p.checkpoint_period_images) == 313
    assert p.schedule.iters(p.eval_period_images) == 625 and p.checkpoint_minutes == 30


def test_backward_passes_count_in_global_batch():
    solver = SolverConfig(images_per_rank=2, backward_passes_per_step=2)
    s = Schedule.from_config(solver, world_size=4)
    assert s.global_batch == 16 and s.lr == pytest.approx(0.02) and s.max_iter == 90000
