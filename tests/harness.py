"""Launch real multi-process Horovod jobs from pytest and collect per-rank results.

A worker is a Python module run as ``python -m <module> --out DIR [args]`` under
``horovodrun -np N --gloo|--mpi``; each rank writes ``DIR/rank-<r>.json``.
A job that fails, or does not finish within ``timeout`` seconds, becomes a test
failure that carries the job's whole output (every rank's stdout/stderr).
The environment and the launch are hvd_megdet.localjob's (shared with scripts/experiments).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hvd_megdet import localjob
from hvd_megdet.localjob import BIN, CONTROLLERS, REPO, horovodrun as horovodrun_cmd  # noqa: F401 - for tests

launcher_env = localjob.job_env


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; a hang is a test failure carrying the output."""
    try:
        return localjob.run(cmd, timeout, env, cwd)
    except localjob.JobTimeout as e:
        raise AssertionError(f"{e}\n--- output ---\n{e.output}") from None


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
