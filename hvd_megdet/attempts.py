"""How one launch of the ranks ended, for the launchers that restart it (slurm/megdet.sbatch,
scripts/run.py): its class (done, preempted, user_error, crash), the first failing rank and host,
and whether that looks like a node problem (a process killed by a signal, an ECC/Xid/device
fault, an NCCL network or system error) rather than a bug, bad input or a config that does not fit
(out of memory, an NCCL usage error): see ``node_problem``.

Sources, best first: the ranks' status files (hvd_megdet/errors.py; a rank that raised writes
its reason), then the launcher's own report of the first task to die (srun: "srun: error: HOST:
task 3: Killed"; horovodrun/mpirun: "Process name: 3"), which is all there is for a rank that was
killed. Shell use (the job script):

    eval "$(python -m hvd_megdet.attempts STATUS_DIR LAUNCHER_LOG EXIT_CODE)"
    # -> ATTEMPT_CLASS, FIRST_RANK, FIRST_HOST, FIRST_REASON, NODE_PROBLEM
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from hvd_megdet.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR

_SRUN = re.compile(r"srun: error: (\S+): tasks? (\d+)(?:[-,]\d+)*: (.+)")
# a node lost as a whole (power, kernel, network): SLURM says so; its ranks could not say a word and the
# survivors' reports (a broken peer, the watchdog) are consequences
_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)")
_MPIRUN = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+) \((\w+)\)")
_PROCESS = re.compile(r"Process name: (?:\[\[\d+,\d+\],(\d+)\]|(\d+))")
_EXIT = re.compile(r"Exit code: (-?\d+)")
# Node blame needs positive evidence of a sick node: a failure that is the same on any node (a config
# or a bug) must not exclude a healthy one, and an ambiguous message ("unhandled cuda error",
# "internal error", "unknown error") blames nobody: the attempt is still a crash and restarts.
_NODE_SIGNS = re.compile("|".join([
    # the process was killed (srun: "task 5: Killed", "Segmentation fault", "Bus error"; mpirun's
    # "exited on signal 9"; horovodrun's "Exit code: 137" -> launcher_first's "killed by signal 9")
    r"\bKilled\b", r"killed by signal", r"exited on signal", r"Segmentation fault", r"Bus error",
    r"NODE_FAIL", r"node failure",
    # the GPU or its driver: ECC (cudaErrorECCUncorrectable, CUDA_ERROR_ECC_UNCORRECTABLE), NVLink,
    # Xid lines of the driver ("NVRM: Xid (PCI:0000:3b:00): 79, ..."), a GPU gone from the bus,
    # "unspecified launch failure" (cudaErrorLaunchFailure: the kernel died on the device, usually with
    # an Xid on the node). Not "busy or unavailable" (cudaErrorDevicesUnavailable): a stale process on
    # the node, or just two ranks on one GPU in exclusive-process mode (a launch config).
    r"uncorrectable ECC", r"ECC_UNCORRECTABLE", r"ECCUncorrectable", r"uncorrectable NVLink", r"\bXid\b",
    r"fallen off the bus", r"unspecified launch failure",
    # NCCL's network and system errors (torch: "NCCL error in: ..., unhandled system error"; Horovod:
    # "ncclAllReduce failed: unhandled system error"), a peer's side gone ("remote process exited or
    # there was a network error", ncclRemoteError) and the transports underneath (NET/IB, NET/Socket,
    # NET/OFI, ibverbs). Which end of a broken link is sick is unknowable from one message: the rank
    # that failed first is blamed, and a sick node shows itself again on the next attempt.
    r"unhandled system error", r"ncclSystemError", r"remote process exited or there was a network error",
    r"ncclRemoteError", r"NET/IB", r"NET/Socket", r"NET/OFI", r"\bibv_\w+",
]))
# Failures that say the job, not the node, is wrong (checked first: they win over a node sign in the
# same message, e.g. "ncclAllReduce failed: unhandled cuda error ... Cuda failure 'out of memory'"):
# - out of memory: the batch or the model does not fit (torch.OutOfMemoryError "CUDA out of memory.
#   Tried to allocate ..."; cuBLAS/cuDNN handles that cannot be allocated; NCCL's "Cuda failure 'out of
#   memory'"; srun's "task 3: Out Of Memory" = the cgroup's host-memory limit);
# - NCCL usage errors: "invalid usage" (ncclInvalidUsage, e.g. "Duplicate GPU detected : rank 1 and rank
#   0 both on CUDA device 1000" when more ranks than GPUs run on a node) and "invalid argument";
# - "an illegal memory access was encountered" (cudaErrorIllegalAddress), "misaligned address",
#   "device-side assert triggered", "an illegal instruction": a kernel reading out of bounds is a
#   software bug (or bad input) that follows the job to any node; unlike "unspecified launch failure",
#   a healthy GPU reports it faithfully, so a node would be excluded for nothing;
# - a DataLoader worker killed by a signal: the kernel's OOM killer (too many or too big workers) or a
#   full /dev/shm ("Bus error ... out of shared memory"): host configuration, the same on every node.
_NOT_NODE_SIGNS = re.compile("|".join([
    r"out of memory", r"OutOfMemoryError", r"_STATUS_ALLOC_FAILED", r"oom[-_]kill",
    r"invalid usage", r"ncclInvalidUsage", r"Duplicate GPU detected",
    r"invalid argument", r"ncclInvalidArgument",
    r"illegal memory access", r"misaligned address", r"device-side assert triggered", r"illegal instruction",
    r"DataLoader worker",
]), re.IGNORECASE)


def node_problem(reason: str) -> bool:
    """Whether the first failure's text points at its node (exclude it) rather than at the job."""
    return bool(reason) and not _NOT_NODE_SIGNS.search(reason) and bool(_NODE_SIGNS.search(reason))


def status_records(status_dir) -> list[dict]:
    out = []
    for f in Path(status_dir).glob("*-rank-*.json") if status_dir and Path(status_dir).is_dir() else ():
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(out, key=lambda r: r["time"])


def launcher_first(text: str, rank_hosts: list[str] | None = None) -> dict | None:
    """The first task the launcher reported dead, as {rank, host, reason}."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        m = _SRUN.search(line)
        if m:
            return {"rank": int(m[2]), "host": m[1], "reason": m[3].strip()}
        m = _MPIRUN.search(line)
        if m:
            return {"rank": int(m[1]), "host": m[2], "reason": f"killed by signal {m[3]} ({m[4]})"}
        m = _PROCESS.search(line)
        if m:
            rank = int(m[1] or m[2])
            host = rank_hosts[rank] if rank_hosts and rank < len(rank_hosts) else "?"
            code = next((int(e[1]) for e in map(_EXIT.search, lines[k + 1:k + 3]) if e), None)
            sig = -code if code is not None and code < 0 else (code - 128 if code and code > 128 else None)
            reason = f"killed by signal {sig}" if sig else f"exited first with code {code}"
            return {"rank": rank, "host": host, "reason": reason}
    return None


def classify(code: int, status_dir, launcher_text: str = "", rank_hosts: list[str] | None = None) -> dict:
    records = status_records(status_dir)
    kinds = {r["class"] for r in records}
    first = None
    if "user_error" in kinds or (code == EXIT_USER_ERROR and "crash" not in kinds):
        kind = "user_error"
        first = next((r for r in records if r["class"] == "user_error"), None)
    elif code == EXIT_OK and not kinds - {"preempted"}:
        kind = "done"
    elif "preempted" in kinds or code == EXIT_PREEMPTED:
        kind = "preempted"
    elif _NODE_FAILURE.search(launcher_text):
        kind = "crash"
        first = {"rank": -1, "host": _NODE_FAILURE.search(launcher_text)[1],
                 "reason": f"node failure ({_NODE_FAILURE.search(launcher_text)[0].strip()})"}
    else:
        kind = "crash"
        reported = {r["rank"] for r in records}
        dead = launcher_first(launcher_text, rank_hosts)
        # a rank the launcher saw die without a word of its own was killed: that is the first failure
        stuck = [r for r in records if "this rank is the one that hangs" in r["reason"]]
        first = dead if dead and dead["rank"] not in reported else \
            (stuck[0] if stuck else records[0] if records else dead)
    return {"class": kind, "first_rank": first["rank"] if first else -1,
            "first_host": first["host"] if first else "", "first_reason": first["reason"] if first else "",
            "node_problem": bool(kind == "crash" and first and node_problem(first.get("reason", "")))}


def main(argv: list[str]) -> int:
    status_dir, launcher_log, code = argv[0], argv[1], int(argv[2])
    text = Path(launcher_log).read_text(errors="replace") if Path(launcher_log).is_file() else ""
    res = classify(code, status_dir, text)
    names = {"class": "ATTEMPT_CLASS", "first_rank": "FIRST_RANK", "first_host": "FIRST_HOST",
             "first_reason": "FIRST_REASON", "node_problem": "NODE_PROBLEM"}
    for k, v in res.items():
        v = int(v) if isinstance(v, bool) else v
        print(f"{names[k]}={shlex.quote(str(v).splitlines()[0] if str(v) else '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
