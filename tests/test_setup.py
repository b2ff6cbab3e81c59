"""scripts/setup.sh checks its prerequisites before it creates or builds anything: on a machine
without apt or root (``--no-system-packages``) a missing tool is named with what to load, exit 2,
and no venv is created; a CUDA toolkit of another major version than torch's is refused by name.
Each case runs the real script in seconds (``--check-only``, or failing before the venv)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"
BASH = shutil.which("bash")


def path_without(tmp_path: Path, hidden: set[str]) -> str:
    """A PATH holding links to every program on this PATH except ``hidden`` ones."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            src, dst = os.path.join(d, name), farm / name
            if name in hidden or dst.is_symlink() or os.path.isdir(src) or not os.access(src, os.X_OK):
                continue
            dst.symlink_to(src)
    return str(farm)


def fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script + "\n")
    (folder / name).chmod(0o755)


def setup(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SETUP), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_mpi_without_apt_names_what_to_load_and_builds_nothing(tmp_path):
    venv = tmp_path / "venv"
    path = path_without(tmp_path, {"mpicc", "mpirun", "mpiexec", "apt-get"})
    marker = tmp_path / "apt-called"
    fake_tool(Path(path), "apt-get", f"touch {marker}; exit 1")  # must never run
    res = setup(["--no-system-packages"], {"PATH": path, "HVD_MEGDET_VENV": str(venv),
                                           "PYTHON": sys.executable, "HVD_MEGDET_MPI": "1"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "MPI" in res.stdout and "MISSING" in res.stdout, res.stdout
    assert "module load openmpi" in res.stderr and "openmpi-bin libopenmpi-dev" in res.stderr, res.stderr
    assert "C++20 compiler" in res.stdout and "MISSING: no mpicc" in res.stdout  # the others were checked too
    assert not venv.exists() and not marker.exists()
    # the same PATH with a Gloo-only build needs no MPI: all checks pass (no venv yet: nothing else runs)
    res = setup(["--no-system-packages", "--check-only"], {"PATH": path, "HVD_MEGDET_VENV": str(venv),
                                                           "PYTHON": sys.executable, "HVD_MEGDET_MPI": "0"})
    assert res.returncode == 0 and "prerequisites ok" in res.stdout, res.stdout + res.stderr
    assert not venv.exists() and not marker.exists()


def test_old_compiler_is_missing_old_cmake_comes_from_pypi(tmp_path):
    fakes = tmp_path / "fakes"
    fake_tool(fakes, "g++", 'for a; do [ "$a" = -std=c++20 ] && { echo "unrecognized option" >&2; exit 1; }; '
                            '[ "$a" = -dumpfullversion ] && { echo 8.5.0; exit 0; }; done; exec g++ "$@"')
    fake_tool(fakes, "cmake", 'echo "cmake version 3.10.2"')
    res = setup(["--no-system-packages", "--check-only"],
                {"PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
                 "HVD_MEGDET_VENV": str(tmp_path / "venv"), "CXX": str(fakes / "g++")})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot compile -std=c++20" in res.stdout and "(8.5.0)" in res.stdout, res.stdout
    assert "module load gcc/12" in res.stderr, res.stderr
    assert "cmake from PyPI goes into the venv" in res.stdout  # not missing: pip brings one
    assert "missing: C++20 compiler." in res.stderr, res.stderr


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "python").exists(), reason="tests run outside a venv")
def test_cuda_major_must_match_torch_and_the_cache_key_names_the_build(tmp_path):
    import torch
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    env = {"HVD_MEGDET_VENV": sys.prefix, "HVD_MEGDET_GPU": "1"}
    cuda = tmp_path / "cuda"
    fake_tool(cuda / "bin", "nvcc", 'echo "Cuda compilation tools, release 12.4, V12.4.131"')
    res = setup(["--check-only"], {**env, "CUDA_HOME": str(cuda)})
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{cuda}/bin/nvcc is CUDA 12.4" in res.stderr, res.stderr
    assert f"built for CUDA {torch.version.cuda}" in res.stderr, res.stderr
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        return
    res = setup(["--check-only"], env)  # this machine's own toolkit and NCCL
    assert res.returncode == 0, res.stdout + res.stderr
    key = next(line for line in res.stdout.splitlines() if "cache key" in line).split()[-1]
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    py = "%d.%d" % sys.version_info[:2]
    assert key.startswith(f"horovod-0.28.1p2-nccl-py{py}-torch{torch.__version__}-cuda"), key
    assert f"-nccl{nccl}-" in key and ("-openmpi" in key or "-mpi" in key), key
