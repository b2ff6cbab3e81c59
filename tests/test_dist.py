"""hvd_megdet.dist and launch under real horovodrun jobs, with Gloo and with MPI; device selection."""
import re

import pytest
import torch

from hvd_megdet import device, dist

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
        assert res["env"]["horovod"] == "0.28.1" and res["device"] == "cpu" and "device" not in res["env"]
        more = f"; {np_ - 1} more rank\\(s\\): \\{list(range(1, np_))}" if np_ > 1 else ""
        assert re.search(r"train.device=cuda: rank 0 on .*: CUDA is not usable: Found no NVIDIA driver.*"
                         r"built for CUDA \d+\.\d+, the driver supports CUDA none .*CUDA_VISIBLE_DEVICES="
                         rf".*{more} \(this is rank {r}\)", res["cuda"]), res["cuda"]
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


@pytest.mark.parametrize("collective", ["broadcast_parameters", "average_scalars"])
def test_hang_in_a_collective_is_named_by_the_watchdog(tmp_path, collective):
    """Rank 1 hangs before a collective that rank 0 is inside: rank 0's watchdog names it."""
    _, res = launch(MOD, 2, "mpi", tmp_path, ["--hang-in", collective], timeout=120, expect_ok=False)
    assert res.returncode != 0
    assert f"waiting in collective '{collective}' for a peer that is stuck" in res.stdout, res.stdout
    assert "stuck outside any collective: this rank is the one that hangs" in res.stdout, res.stdout


def test_every_collective_is_recorded_for_the_watchdog(monkeypatch):
    """(One process, Horovod's calls replaced by a recorder.) Each helper of dist.py makes its Horovod
    call inside ``blocking``, named: the watchdog can say which collective a rank waits in."""
    import horovod.torch as hvd
    seen = []

    def recorder(op):
        def record(*a, **k):
            seen.append((op, dist.current_collective()))
            if op == "alltoall":
                return a[0], torch.tensor([a[0].numel()], dtype=torch.int32)  # one sender
            if op == "allgather_object":
                return [a[0]] * 2
            return a[0] if a else None
        return record
    for op in ("allreduce", "allgather_object", "alltoall", "broadcast_object", "barrier",
               "broadcast_parameters", "broadcast_optimizer_state"):
        monkeypatch.setattr(hvd, op, recorder(op))
    monkeypatch.setattr(dist, "size", lambda: 2)
    dist.allreduce(torch.ones(1), name="a")
    dist.allgather_object(1, name="g")
    dist.gather_object(1, name="go")
    dist.broadcast_object(1, name="b")
    dist.barrier(name="bar")
    dist.average_scalars({"x": 1.0}, name="avg")
    dist.broadcast_parameters({}, name="bp")
    dist.broadcast_optimizer_state(None, name="bo")
    assert seen == [("allreduce", "a"), ("allgather_object", "g"), ("allreduce", "go.size"), ("alltoall", "go"),
                    ("broadcast_object", "b"), ("barrier", "bar"), ("allreduce", "avg"),
                    ("broadcast_parameters", "bp"), ("broadcast_optimizer_state", "bo")]
    assert dist.current_collective() is None


def test_more_ranks_than_gpus_is_a_user_error(monkeypatch):
    """(Mocked GPUs: none here.) 4 ranks on a host with 2 visible GPUs fail before any CUDA call
    (NCCL would otherwise fail later with "Duplicate GPU detected", read as a node fault); with
    enough GPUs each rank takes cuda:local_rank, with exactly one visible (per-task binding) cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "local_size", lambda: 4)
    monkeypatch.setattr(dist, "local_rank", lambda: 3)
    monkeypatch.setattr(device, "_gpu_id", lambda dev: f"GPU-{dev.index}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for kind in ("cuda", "auto"):
        with pytest.raises(device.DeviceError, match=r"train.device=.*: rank 0 on .*: 4 ranks on .* but 2 visible "
                                                   r"GPUs \(CUDA_VISIBLE_DEVICES=0,1\): start one rank per GPU"):
            device.select_device(kind)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "local_size", lambda: 2)
    monkeypatch.setattr(dist, "local_rank", lambda: 1)
    assert device.select_device("cuda") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "local_size", lambda: 8)
    assert device.select_device("cuda") == torch.device("cuda", 0)
    assert device.select_device("cpu") == torch.device("cpu")
    with pytest.raises(device.DeviceError, match="must be auto, cuda or cpu"):
        device.select_device("gpu")


def test_device_problems_across_ranks():
    """The verdict every rank raises after the allgather of (host, GPU, problem)."""
    ok = [("a", "GPU-0", None), ("a", "GPU-1", None), ("b", "GPU-0", None)]
    assert device.device_problems(ok, "cuda") is None
    assert device.device_problems([("a", None, None)] * 3, "auto") is None          # all on the CPU: fine
    shared = [("a", "GPU-0", None), ("a", "GPU-0", None), ("b", "GPU-0", None)]
    assert "ranks [0, 1] on a share one GPU (GPU-0)" in device.device_problems(shared, "cuda")
    mixed = [("a", "GPU-0", None), ("b", None, None), ("b", None, None)]
    assert "ranks [1, 2] on ['b'] have no usable CUDA while the others use a GPU" in \
        device.device_problems(mixed, "auto")
    failing = [("a", "GPU-0", None), ("b", None, "CUDA is not usable: x"), ("c", None, "CUDA is not usable: y")]
    assert device.device_problems(failing, "cuda") == "rank 1 on b: CUDA is not usable: x; 1 more rank(s): [2]"
