"""Launch real multi-process Horovod jobs from pytest and collect per-rank results.

A worker is a Python module run as ``python -m <module> --out DIR [args]`` under
``horovodrun -np N --gloo|--mpi``; each rank writes ``DIR/rank-<r>.json``.
A job that fails, or does not finish within ``timeout`` seconds, becomes a test
failure that carries the job's whole output (every rank's stdout/stderr).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONTROLLERS = ("gloo", "mpi")


def launcher_env(threads: int = 1, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "OMP_NUM_THREADS": str(threads),
        # Open MPI refuses root without these; the container's ptrace rules break CMA.
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    })
    env.update(extra or {})
    return env


def horovodrun_cmd(np: int, controller: str, argv: list[str]) -> list[str]:
    assert controller in CONTROLLERS, controller
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}", *argv]


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"TIMEOUT after {timeout}s (hang?): {' '.join(cmd)}\n--- output ---\n{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def launch(module: str, np: int, controller: str, out_dir: Path, args: list[str] = (),
           timeout: float = 300, env: dict | None = None, expect_ok: bool = True):
    """Run worker ``module`` on ``np`` ranks; return (per-rank results, CompletedProcess)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = horovodrun_cmd(np, controller, [sys.executable, "-m", module, "--out", str(out_dir), *args])
    res = run(cmd, timeout, env)
    if not expect_ok:
        return [], res
    results = []
    for r in range(np):
        f = out_dir / f"rank-{r}.json"
        if res.returncode != 0 or not f.exists():
            raise AssertionError(f"job failed (exit {res.returncode}, rank {r} wrote "
                                 f"{'a' if f.exists() else 'no'} result): {' '.join(cmd)}\n--- output ---\n{res.stdout}")
        results.append(json.loads(f.read_text()))
    return results, res
