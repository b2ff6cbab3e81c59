"""The LR policy against hand-computed sequences (scaling, warmup, steps, resume position)."""
import pytest

from hvd_megdet import config
from hvd_megdet.config import SolverConfig
from hvd_megdet.lr_schedule import Schedule


def test_megdet_at_128_ranks():
    s = Schedule.from_config(config.load("megdet_r50_fpn").solver, world_size=128)
    assert s.global_batch == 256
    assert s.lr == pytest.approx(0.32)                  # 0.02 x 256 / 16
    assert s.max_iter == 5625 and s.steps == (3750, 5000)  # 90k, 60k, 80k x 16/256
    assert s.lr_at(0) == pytest.approx(0.32 * 0.001)
    assert s.lr_at(250) == pytest.approx(0.32 * (0.001 * 0.5 + 0.5))
    assert s.lr_at(499) == pytest.approx(0.32 * (0.001 / 500 + 499 / 500))
    assert s.lr_at(500) == pytest.approx(0.32)
    assert s.lr_at(3749) == pytest.approx(0.32)
    assert s.lr_at(3750) == pytest.approx(0.032)
    assert s.lr_at(5000) == pytest.approx(0.0032)


@pytest.mark.parametrize("world, lr, max_iter, steps", [
    (8, 0.02, 90000, (60000, 80000)),     # the paper's baseline: 16 images on 8 GPUs
    (16, 0.04, 45000, (30000, 40000)),
    (32, 0.08, 22500, (15000, 20000)),
    (64, 0.16, 11250, (7500, 10000)),
])
def test_linear_scaling_follows_world_size(world, lr, max_iter, steps):
    s = Schedule.from_config(config.load("megdet_r50_fpn").solver, world_size=world)
    assert (s.lr, s.max_iter, s.steps) == (pytest.approx(lr), max_iter, steps)


def test_full_sequence_small():
    solver = SolverConfig(images_per_rank=2, base_lr=0.1, reference_batch=4, scale_schedule=False,
                          max_iter=10, steps=[6, 8], gamma=0.5, warmup_iters=4, warmup_factor=0.2)
    s = Schedule.from_config(solver, world_size=2)
    expected = [0.1 * 0.2, 0.1 * (0.2 * 0.75 + 0.25), 0.1 * (0.2 * 0.5 + 0.5), 0.1 * (0.2 * 0.25 + 0.75),
                0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert [s.lr_at(i) for i in range(10)] == pytest.approx(expected)
    # a resumed run asks for iteration k and gets the same value: a pure function
    assert [s.lr_at(i) for i in range(5, 10)] == pytest.approx(expected[5:])


def test_backward_passes_count_in_global_batch():
    solver = SolverConfig(images_per_rank=2, backward_passes_per_step=2)
    s = Schedule.from_config(solver, world_size=4)
    assert s.global_batch == 16 and s.lr == pytest.approx(0.02) and s.max_iter == 90000
