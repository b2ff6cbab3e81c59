#!/usr/bin/env bash
# One-command, idempotent set-up of hvd_megdet on Debian/Ubuntu:
#   system packages -> .venv (torch, torchvision, mpi4py, pycocotools, ...) ->
#   Horovod 0.28.1 built from the PyPI sdist (patched, wheel cached outside the
#   repo) -> the project itself (editable) -> `horovodrun --check-build`.
#
# Options / environment:
#   --slurm                 also install Debian's SLURM + munge + PMIx (tests, local cluster)
#   HVD_MEGDET_GPU=1        build Horovod with NCCL for a GPU cluster (see README)
#   HVD_MEGDET_VENV=DIR     virtual environment (default: <repo>/.venv)
#   HVD_MEGDET_CACHE=DIR    wheel cache (default: ~/.cache/hvd_megdet)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_MEGDET_VENV:-$REPO/.venv}
CACHE=${HVD_MEGDET_CACHE:-$HOME/.cache/hvd_megdet}
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
WITH_SLURM=0
for arg in "$@"; do
  case "$arg" in
    --slurm) WITH_SLURM=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }
die() { printf '\nsetup.sh: ERROR: %s\n' "$*" >&2; exit 1; }
start=$(date +%s)

# --- Python -------------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python 3.10-3.12 (or set PYTHON=...)"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$PYVER" in
  3.10|3.11|3.12) ;;
  *) die "Python $PYVER is not supported: torch $TORCH_VERSION / horovod $HOROVOD_VERSION need Python 3.10-3.12 (set PYTHON=/path/to/python3.11)" ;;
esac

# --- System packages ----------------------------------------------------
PKGS=(openmpi-bin libopenmpi-dev cmake g++)
[ "$WITH_SLURM" = 1 ] && PKGS+=(slurmctld slurmd slurm-client munge libpmix-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found; install these packages with your system's package manager: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"
    else die "not root and no password-less sudo: ask an administrator to run
    apt-get update && apt-get install -y ${missing[*]}
then run this script again"; fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Virtual environment ------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip install, without the warnings some machines' pip config prints for every package
pip_install() {
  "$VPY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if ! "$VPY" -c "import torch, torchvision; assert torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (large; taken from the local wheel cache when present)"
  pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
say "installing Python dependencies"
pip_install -r "$REPO/requirements.txt"

# --- Horovod (built once, cached) --------------------------------------
FLAVOUR=cpu
[ "${HVD_MEGDET_GPU:-0}" = 1 ] && FLAVOUR=nccl
KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-py$PYVER-$FLAVOUR"
WHEELDIR="$CACHE/wheels/$KEY"
# installed and of the requested flavour (a CPU build where NCCL is wanted, or the reverse, is rebuilt/reinstalled)
if "$VPY" -c "import horovod, horovod.torch as h; assert horovod.__version__ == '$HOROVOD_VERSION'; \
assert bool(h.nccl_built()) == ('$FLAVOUR' == 'nccl')" 2>/dev/null; then
  say "horovod $HOROVOD_VERSION ($FLAVOUR) already installed"
else
  if "$VPY" -c "import horovod" 2>/dev/null; then
    say "the installed horovod is not the $HOROVOD_VERSION $FLAVOUR build: replacing it"
  fi
  if ! ls "$WHEELDIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building horovod $HOROVOD_VERSION ($FLAVOUR) from source: takes ~6 minutes, once"
    BUILD=$(mktemp -d)
    LOG="$CACHE/horovod-build-$KEY.log"
    mkdir -p "$CACHE"
    "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION"
    tar -xzf "$BUILD"/horovod-$HOROVOD_VERSION.tar.gz -C "$BUILD"
    SRC="$BUILD/horovod-$HOROVOD_VERSION"
    # Patch (see README "Troubleshooting"): torch >= 2.x headers need C++20 but
    # horovod 0.28.1 pins C++14; gcc 13 no longer pulls <stdexcept>/<string>
    # in transitively. Upstream fixed this after 0.28.1 but never released it.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
      "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 20' "$SRC/horovod/torch/CMakeLists.txt" \
      || die "horovod patch did not apply (CMAKE_CXX_STANDARD): $SRC"
    sed -i '0,/#include <string>/s//#include <stdexcept>\n#include <string>/' "$SRC/horovod/common/common.h"
    sed -i '0,/#include <vector>/s//#include <string>\n#include <vector>/' "$SRC/horovod/common/group_table.h"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
           HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
    export MAKEFLAGS="-j$(nproc)"
    if [ "$FLAVOUR" = nccl ]; then
      # GPU cluster: NCCL unless HOROVOD_NCCL_HOME is set (e.g. from a module) comes from the
      # nvidia-nccl wheel that torch's CUDA build already installed (nvidia/nccl/{include,lib}).
      export HOROVOD_GPU_OPERATIONS=NCCL
      if [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
        HOROVOD_NCCL_HOME=$("$VPY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])') \
          || die "no NCCL: install torch's nvidia-nccl wheel or set HOROVOD_NCCL_HOME"
        # the wheel ships only libnccl.so.2; CMake's FindNCCL looks for libnccl.so
        [ -e "$HOROVOD_NCCL_HOME/lib/libnccl.so" ] || ln -s libnccl.so.2 "$HOROVOD_NCCL_HOME/lib/libnccl.so"
        export HOROVOD_NCCL_HOME HOROVOD_NCCL_LINK=SHARED
      fi
      export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    else
      # A CUDA build of torch makes horovod's CMake look for a CUDA toolkit even
      # for CPU collectives; where one is installed, point CMake at its root
      # (nvcc found first on PATH, e.g. /usr/local/bin, hides the headers).
      if [ -d "${CUDA_HOME:-/usr/local/cuda}" ]; then
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
      fi
    fi
    if [ -n "${CUDA_HOME:-}" ]; then
      export CUDACXX="$CUDA_HOME/bin/nvcc" CUDAToolkit_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
    fi
    if ! (cd "$SRC" && "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$BUILD/dist" . ) >"$LOG" 2>&1; then
      tail -n 30 "$LOG" >&2
      die "horovod build failed; full log: $LOG (see README 'Troubleshooting')"
    fi
    mkdir -p "$WHEELDIR"
    cp "$BUILD"/dist/horovod-*.whl "$WHEELDIR/"
    rm -rf "$BUILD"
    echo "cached wheel in $WHEELDIR (build log $LOG)"
  fi
  say "installing horovod from $WHEELDIR"
  pip_install --no-deps --force-reinstall "$WHEELDIR"/horovod-*.whl
  pip_install cffi cloudpickle psutil pyyaml packaging  # horovod's runtime deps
fi

# --- The project --------------------------------------------------------
say "installing hvd_megdet (editable)"
pip_install --no-deps --no-build-isolation -e "$REPO"

say "horovodrun --check-build"
"$VENV/bin/horovodrun" --check-build
echo "setup done in $(( $(date +%s) - start ))s; activate with: source $VENV/bin/activate"
