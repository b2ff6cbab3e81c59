"""Launching Horovod jobs of this repository from Python on one machine: the tests' harness and the
experiments (scripts/experiments/) share it. Standard library only: it never loads horovod.

The environment is what Open MPI needs on a development machine or CI runner: root allowed, more
ranks than cores (oversubscription), no cross-memory attach (container ptrace rules break it), one
thread per rank by default, this repository and this interpreter's bin first.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONTROLLERS = ("gloo", "mpi")


def job_env(threads: int = 1, extra: dict | None = None) -> dict:
    """``os.environ`` plus what a local horovodrun / mpirun / srun job needs here."""
    e = dict(os.environ)
    e.update({
        "PYTHONPATH": f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}",
        "PATH": f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        "OMP_NUM_THREADS": str(threads),
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    })
    e.update(extra or {})
    return e


def horovodrun(np: int, controller: str, argv: list[str]) -> list[str]:
    """``horovodrun -np N -H localhost:N --gloo|--mpi ARGV`` with this interpreter's horovodrun."""
    if controller not in CONTROLLERS:
        raise ValueError(f"controller {controller!r}: one of {CONTROLLERS}")
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}", *argv]


class JobTimeout(RuntimeError):
    def __init__(self, cmd: list[str], timeout: float, output: str):
        super().__init__(f"TIMEOUT after {timeout}s (hang?): {' '.join(cmd)}")
        self.output = output


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, stdout and stderr together; past ``timeout`` the whole
    group (launcher and every rank) is killed and JobTimeout carries the output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env if env is not None else job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise JobTimeout(cmd, timeout, out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)
