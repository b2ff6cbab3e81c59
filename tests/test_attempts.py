"""Which failures blame the node they happened on (hvd_megdet/attempts.py node_problem): the texts
are the ones torch, NCCL, Horovod, the CUDA driver and the launchers print (from public bug reports),
as a rank's status file or the launcher's report carries them."""
import json

import pytest

from hvd_megdet import attempts

NODE = [
    # a task killed by a signal, as each launcher reports it (attempts.launcher_first)
    "Killed",                                          # srun: error: gpu07: task 5: Killed
    "Segmentation fault",
    "killed by signal 9 (Killed)",                     # mpirun: ... exited on signal 9 (Killed)
    "killed by signal 9",                              # horovodrun: Exit code: 137
    # the GPU
    "RuntimeError: CUDA error: uncorrectable ECC error encountered\nCUDA kernel errors might be "
    "asynchronously reported at some other API call, so the stacktrace below might be incorrect.\nFor "
    "debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable "
    "device-side assertions.",
    "failed call to cuDevicePrimaryCtxRetain: CUDA_ERROR_ECC_UNCORRECTABLE: uncorrectable ECC error "
    "encountered",
    "RuntimeError: CUDA error: unspecified launch failure\nCompile with `TORCH_USE_CUDA_DSA` to enable "
    "device-side assertions.",
    "NVRM: Xid (PCI:0000:44:00): 79, GPU has fallen off the bus.",
    # NCCL's system and network errors, through Horovod and through torch
    "HorovodInternalError: ncclAllReduce failed: unhandled system error (run with NCCL_DEBUG=INFO for "
    "details)",
    "HorovodInternalError: ncclCommInitRank failed: unhandled system error",
    "torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/"
    "ProcessGroupNCCL.cpp:1347, remote process exited or there was a network error, NCCL version 2.18.5\n"
    "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
    "NCCL error: remote process exited or there was a network error, NCCL version 2.14.3 ncclRemoteError: "
    "A call failed possibly due to a network error or a remote process exiting prematurely. Last error: "
    "NET/IB : Got completion from peer 11.214.147.122<39138> with error 12, opcode 0, len 0, vendor err 129",
    "misc/socket.cc:538 NCCL WARN Net : Connection closed by remote peer ... NET/Socket : recv failed",
]

NOT_NODE = [
    # out of memory: the config does not fit, on any node
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.70 GiB. GPU 0 has a total capacty of "
    "6.00 GiB of which 0 bytes is free. Of the allocated memory 2.93 GiB is allocated by PyTorch, and "
    "2.30 GiB is reserved by PyTorch but unallocated.",
    "RuntimeError: CUDA out of memory. Tried to allocate 824.00 MiB (GPU 0; 7.93 GiB total capacity; "
    "4.71 GiB already allocated; 362.38 MiB free; 5.77 GiB reserved in total by PyTorch)",
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1331, unhandled cuda error, "
    "NCCL version 2.18.1\nncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
    "Cuda failure 'out of memory'",
    "Out Of Memory",                                   # srun: error: node3: tasks 1-3: Out Of Memory
    # NCCL usage errors: a launch config (more ranks than GPUs) or a bug
    "HorovodInternalError: ncclCommInitRank failed: invalid usage (run with NCCL_DEBUG=WARN for details)",
    "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage (run "
    "with NCCL_DEBUG=WARN for details), NCCL version 2.19.3\nncclInvalidUsage: This usually reflects "
    "invalid usage of NCCL library.\nLast error:\nDuplicate GPU detected : rank 3 and rank 0 both on "
    "CUDA device f000",
    # a kernel out of bounds: a software bug, whatever the node
    "RuntimeError: CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
    "asynchronously reported at some other API call, so the stacktrace below might be incorrect.\nFor "
    "debugging consider passing CUDA_LAUNCH_BLOCKING=1.",
    "RuntimeError: CUDA error: device-side assert triggered",
    # a data worker killed (host OOM killer, a full /dev/shm): host configuration
    "RuntimeError: DataLoader worker (pid 4123) is killed by signal: Killed.",
    "RuntimeError: DataLoader worker (pid 77) is killed by signal: Bus error. It is possible that "
    "dataloader's workers are out of shared memory. Please try to raise your shared memory limit.",
    # ambiguous or plainly software: no evidence against the node
    "HorovodInternalError: ncclAllReduce failed: unhandled cuda error",
    "RuntimeError: CUDA error: CUDA-capable device(s) is/are busy or unavailable",
    "HorovodInternalError: Horovod has been shut down. This was caused by an exception on one of the ranks",
    "ValueError: signal only works in main thread of the main interpreter",
    "InjectedFault: injected fault at iteration 3",
    "no progress for 12 s at iteration 7 (forward): this rank is the one that hangs",
    "",
]


@pytest.mark.parametrize("reason", NODE)
def test_node_problems_blame_the_node(reason):
    assert attempts.node_problem(reason)


@pytest.mark.parametrize("reason", NOT_NODE)
def test_config_and_software_failures_blame_no_node(reason):
    assert not attempts.node_problem(reason)


def _status(folder, rank, t, reason):
    (folder / f"crash-rank-{rank:05d}.json").write_text(json.dumps(
        {"class": "crash", "rank": rank, "host": f"gpu{rank:02d}", "time": t, "reason": reason}))


def test_classify_sets_node_problem_from_the_first_failure(tmp_path):
    # rank 2 ran out of GPU memory first; its peers then saw the collective break: a crash, no node blamed
    _status(tmp_path, 2, 1.0, NOT_NODE[0])
    _status(tmp_path, 0, 2.0, NODE[8])
    srun = ("srun: error: gpu02: task 2: Exited with exit code 1\n"
            "srun: error: gpu00: task 0: Exited with exit code 1\n")
    res = attempts.classify(1, tmp_path, srun)
    assert (res["class"], res["first_rank"], res["node_problem"]) == ("crash", 2, False)
    # srun's cgroup OOM kill of a task that left no word: named by the launcher, still not the node's fault
    res = attempts.classify(1, tmp_path, "srun: error: gpu05: tasks 5-7: Out Of Memory\n")
    assert (res["first_rank"], res["first_host"], res["node_problem"]) == (5, "gpu05", False)
    # a network error on the rank that failed first blames its node
    (tmp_path / "crash-rank-00002.json").unlink()
    res = attempts.classify(1, tmp_path, "")
    assert (res["first_rank"], res["node_problem"]) == (0, True)
    # the shell form the job script evals
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "hvd_megdet.attempts", str(tmp_path), "/nonexistent", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "ATTEMPT_CLASS=crash" in out and "NODE_PROBLEM=1" in out and "FIRST_RANK=0" in out


def test_node_failure_blames_the_lost_node_not_the_survivors(tmp_path):
    """A node lost as a whole (seen on real hosts, tests/test_cluster.py): its ranks say nothing, the
    survivors' watchdogs report a stuck peer first; srun's "Node failure on HOST" names the node."""
    _status(tmp_path, 1, 1.0, "watchdog: no progress for 32 s at iteration 4 (backward): waiting in collective "
                              "'syncbn.9.bwd' for a peer that is stuck")
    _status(tmp_path, 0, 1.5, "watchdog: no progress for 32 s at iteration 4 (backward)")
    srun = ("srun: error: Node failure on node02\nsrun: Job step aborted: Waiting up to 32 seconds for job step\n"
            "srun: error: node01: task 1: Exited with exit code 1\n")
    res = attempts.classify(143, tmp_path, srun)
    assert (res["class"], res["first_rank"], res["first_host"], res["node_problem"]) == ("crash", -1, "node02", True)
    assert res["first_reason"] == "node failure (srun: error: Node failure on node02)"
    # without srun's word the survivors' report stands, and blames no node (a stuck peer is not evidence)
    res = attempts.classify(143, tmp_path, "srun: error: node01: task 1: Exited with exit code 1\n")
    assert (res["first_host"], res["node_problem"]) == ("gpu01", False)
