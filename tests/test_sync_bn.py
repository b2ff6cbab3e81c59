"""SyncBatchNorm proven against plain BatchNorm2d on each group's concatenated batch.

One job per (np, controller) runs every case (tests/workers/syncbn_checks.py):
equal, uneven and empty per-rank batches, groups of 2 at np=4, momentum=None,
channels_last, |mean|/std = 1e3, fp16/bf16, collective counts, and at np=1 the
ResNet-50 conversion.
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
    if np_ == 4:
        assert {"g2/equal", "g2/uneven", "g2/empty_rank", "g4/equal"} <= set(results[0]["cases"])


def test_sync_bn_single_process_and_resnet50_conversion(tmp_path):
    (res,) = run(tmp_path, 1, "gloo")
    assert_cases([res])
    conv = res["resnet50"]
    assert conv["bn_before"] == 53 and conv["bn_left"] == 0 and conv["sync_bn"] == 53
    assert conv["same_keys"]
    assert conv["eval"] is None and conv["train"] is None and conv["running_after_train"] is None
    assert conv["frozen_eval"] is None and conv["frozen_left"] == 0 and conv["frozen_trainable"]
