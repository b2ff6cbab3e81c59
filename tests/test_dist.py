"""hvd_megdet.dist under real horovodrun jobs, with Gloo and with MPI; device selection."""
import re

import pytest
import torch

from hvd_megdet import dist

from tests.harness import CONTROLLERS, launch

MOD = "tests.workers.dist_checks"


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("np_", [1, 2, 4])
def test_collectives(tmp_path, controller, np_):
    results, _ = launch(MOD, np_, controller, tmp_path, timeout=180)
    ranks = list(range(np_))
    for r, res in enumerate(results):
        assert res["rank"] == r and res["size"] == np_
        assert res["controller"] == controller
        assert res["sum"] == [float(sum(ranks)), float(np_)]
        assert res["avg"] == pytest.approx([sum(ranks) / np_])
        assert res["gathered"] == [{"r": q, "sq": q * q} for q in ranks]
        assert res["bcast"] == {"from": np_ - 1, "payload": list(range(np_))}
        assert res["scalars"] == pytest.approx({"loss": sum(ranks) / np_, "one": 1.0})
        assert res["env"]["horovod"] == "0.28.1" and res["env"]["device"] == "cpu"
        assert re.search(rf"train.device=cuda but CUDA is not usable on rank {r} on .*: Found no NVIDIA driver.*"
                         r"built for CUDA \d+\.\d+, the driver supports CUDA none .*CUDA_VISIBLE_DEVICES=",
                         res["cuda"]), res["cuda"]
    if np_ == 4:  # process sets {0,1} and {2,3}
        for r, res in enumerate(results):
            block = [0, 1] if r < 2 else [2, 3]
            assert res["group_ranks"] == block
            assert res["group_sum"] == [float(sum(block))]
            assert "was not registered" in res["unregistered"]


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_failing_rank_ends_job(tmp_path, controller):
    """A rank that raises while others wait in a collective: non-zero exit, no hang."""
    _, res = launch(MOD, 2, controller, tmp_path, ["--raise-on-rank", "1"], timeout=120, expect_ok=False)
    assert res.returncode != 0
    assert "deliberate failure on rank 1" in res.stdout


def test_more_ranks_than_gpus_is_a_user_error(monkeypatch):
    """(Mocked GPUs: none here.) 4 ranks on a host with 2 visible GPUs fail before any CUDA call
    (NCCL would otherwise fail later with "Duplicate GPU detected", read as a node fault); with
    enough GPUs, each rank takes cuda:local_rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "local_size", lambda: 4)
    monkeypatch.setattr(dist, "local_rank", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for kind in ("cuda", "auto"):
        with pytest.raises(dist.DeviceError, match=r"4 ranks on .* but 2 visible GPU\(s\) \(rank 0 on .*"
                                                   r"CUDA_VISIBLE_DEVICES=0,1\): start one rank per GPU"):
            dist.select_device(kind)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "local_size", lambda: 2)
    monkeypatch.setattr(dist, "local_rank", lambda: 1)
    assert dist.select_device("cuda") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert dist.select_device("cpu") == torch.device("cpu")
    with pytest.raises(dist.DeviceError, match="must be auto, cuda or cpu"):
        dist.select_device("gpu")
