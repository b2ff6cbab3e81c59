"""SyncBatchNorm proven against plain BatchNorm2d on each group's concatenated batch.

One job per (np, controller) runs every case (tests/workers/syncbn_checks.py):
equal, uneven and empty per-rank batches, groups of 2 at np=4, momentum=None,
channels_last, |mean|/std = 1e3, fp16/bf16, collective counts, and at np=1 the
ResNet-50 conversion; the same cases for impl="fused" with reference kernels in place of torch's
CUDA-only ones; HOROVOD_NUM_NCCL_STREAMS > 1 refused with BN groups.
"""
import pytest

from tests.harness import CONTROLLERS, launch

MOD = "tests.workers.syncbn_checks"


def run(tmp_path, np_, controller):
    results, _ = launch(MOD, np_, controller, tmp_path, timeout=420)
    return results


def assert_cases(results):
    for r, res in enumerate(results):
        failed = {case: f for case, f in res["cases"].items() if f}
        assert not failed, f"rank {r}: {failed}"
        assert res["train_collectives_per_layer"] == (2 if res["size"] > 1 else 0)
        assert res["train_collectives_per_layer_fused"] == (2 if res["size"] > 1 else 0)
        assert "needs CUDA tensors" in res["fused_cpu_error"] and "model.syncbn_impl=plain" in res["fused_cpu_error"]
        assert res["nccl_streams"]["whole_world_ok"]
        assert res["eval_collectives"] == 0
        assert res["host_reads_in_forward"] == 0             # no per-layer GPU synchronisation
        assert res["averaged_ok"] and res["average_collectives"] == (1 if res["size"] > 1 else 0)
        if res["size"] > 1:
            assert "expected more than 1 value per channel" in res["group_count_error"]
        # The large-mean case would fail without the shifted fp64 combination:
        assert res["naive_large_mean_rel_error"] > 1e-2


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("np_", [2, 4])
def test_sync_bn_matches_batchnorm(tmp_path, np_, controller):
    results = run(tmp_path, np_, controller)
    assert_cases(results)
    for res in results:
        assert "does not divide the world size" in res["bad_group_error"]
    calls = results[0]["fused_kernel_calls"]
    assert all(calls[k] > 0 for k in ("stats", "elemt", "backward_reduce", "backward_elemt")), calls
    if np_ == 4:
        assert {"g2/equal", "g2/uneven", "g2/empty_rank", "g4/equal", "fused/g2/empty_rank"} <= set(results[0]["cases"])
        for res in results:  # every rank refuses alike, as a user error naming the variable
            err = res["nccl_streams"]["error"]
            assert err and "HOROVOD_NUM_NCCL_STREAMS=2" in err and res["nccl_streams"]["user_error"]


def test_sync_bn_single_process_and_resnet50_conversion(tmp_path):
    (res,) = run(tmp_path, 1, "gloo")
    assert_cases([res])
    conv = res["resnet50"]
    assert conv["bn_before"] == 53 and conv["bn_left"] == 0 and conv["sync_bn"] == 53
    assert conv["same_keys"]
    assert conv["eval"] is None and conv["train"] is None and conv["running_after_train"] is None
    assert conv["frozen_eval"] is None and conv["frozen_left"] == 0 and conv["frozen_trainable"]


def test_statistics_arithmetic_of_both_paths():
    """The fused path's payload (each rank's count, mean, biased variance -> fp64 [Σx, Σx², n]) and the
    shared group_moments give the pooled statistics of uneven ranks, also at |mean|/std = 1e3 where
    fp32 E[x²] − E[x]² has no digit left (plain CPU tensors: the arithmetic, not the kernels)."""
    import torch

    from hvd_megdet.sync_bn import group_moments, local_sums
    g = torch.Generator().manual_seed(0)
    for mean, std in ((0.0, 1.0), (1e4, 10.0)):
        parts = [torch.randn(n, 6, 5, 4, generator=g) * std + mean for n in (1, 3, 0, 2)]
        stats = sum(local_sums(p.shape[0] * 20, *reversed(torch.var_mean(p.double(), (0, 2, 3), correction=0)))
                    if p.numel() else torch.zeros(13, dtype=torch.float64) for p in parts)
        got_mean, got_var, count = group_moments(stats, 6)
        var, ref_mean = torch.var_mean(torch.cat(parts).double(), (0, 2, 3), correction=0)
        assert int(count) == 6 * 20
        torch.testing.assert_close(got_mean.double(), ref_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(got_var.double(), var, rtol=1e-5, atol=0)


def test_fused_refused_on_a_cpu_job(tmp_path):
    """model.syncbn_impl=fused on a CPU job: a user error (exit 2) naming the key, before training."""
    import sys

    from tests.harness import REPO, launcher_env, run as run_cmd
    res = run_cmd([sys.executable, str(REPO / "scripts/train.py"), "--config", "shapes_tiny", "--output-dir",
                   str(tmp_path), "model.syncbn_impl=fused", "train.device=cpu"], timeout=120, env=launcher_env())
    assert res.returncode == 2, res.stdout
    assert "model.syncbn_impl=fused needs a CUDA device" in res.stdout
