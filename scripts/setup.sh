#!/usr/bin/env bash
# One-command, idempotent set-up of hvd_megdet:
#   prerequisites checked (MPI, cmake, a C++20 compiler, Python headers; apt-get only for what is
#   missing) -> .venv (torch, torchvision, mpi4py, pycocotools, ...) -> Horovod 0.28.1 built from the
#   PyPI sdist (patched; wheel cached outside the repo under a key of everything it was built
#   against) -> the project itself (editable) -> `horovodrun --check-build`.
#
# Options:
#   --slurm                 also install Debian's SLURM + munge + PMIx and openssh-server + iproute2
#                           (tests: local SLURM cluster, scripts/local_cluster.sh)
#   --no-system-packages    never call apt-get: use what PATH has (e.g. after `module load`); when
#                           something is missing, print what to load and exit 2
#   --check-only            check the prerequisites, print what was found and exit (0 ok, 2 missing)
# Environment:
#   HVD_MEGDET_GPU=1        build Horovod with NCCL (GPU clusters; README "Setting up on a GPU cluster")
#   HVD_MEGDET_MPI=0        build Horovod without MPI (Gloo controller only; no mpicc/mpirun needed)
#   HVD_MEGDET_VENV=DIR     virtual environment (default: <repo>/.venv)
#   HVD_MEGDET_CACHE=DIR    wheel cache (default: ~/.cache/hvd_megdet)
#   HVD_MEGDET_OFFLINE=DIR  no network: Python packages and horovod's sdist come from DIR, torch and
#                           torchvision are used as the venv has them (implies --no-system-packages)
#   PYTHON=python3.11       interpreter for a new venv
#   CXX, CC                 compilers (default g++, gcc); CUDA_HOME (default /usr/local/cuda): the CUDA
#                           toolkit, whose nvcc must have torch's CUDA major version
#   HOROVOD_NCCL_HOME       NCCL to build against (default: torch's nvidia-nccl wheel)
#   HOROVOD_BUILD_CUDA_CC_LIST  compute capabilities of Horovod's CUDA kernels, e.g. 80,90 (default: every
#                           one nvcc knows, slower to build); part of the cache key
# Exit: 0 done, 1 a step failed (see its log), 2 bad option or missing prerequisite.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_MEGDET_VENV:-$REPO/.venv}
CACHE=${HVD_MEGDET_CACHE:-$HOME/.cache/hvd_megdet}
OFFLINE=${HVD_MEGDET_OFFLINE:-}
HOROVOD_VERSION=0.28.1
PATCHES=p2                         # the patch set applied to its sdist below (part of the cache key)
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
CMAKE_MIN=3.13                     # horovod 0.28.1's cmake_minimum_required
WITH_MPI=${HVD_MEGDET_MPI:-1}
FLAVOUR=cpu
[ "${HVD_MEGDET_GPU:-0}" = 1 ] && FLAVOUR=nccl
WITH_SLURM=0 NO_SYSTEM=0 CHECK_ONLY=0
[ -n "$OFFLINE" ] && NO_SYSTEM=1
for arg in "$@"; do
  case "$arg" in
    --slurm) WITH_SLURM=1 ;;
    --no-system-packages) NO_SYSTEM=1 ;;
    --check-only) CHECK_ONLY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }
die() { printf '\nsetup.sh: ERROR: %s\n' "$*" >&2; exit 1; }
user_error() { printf '\nsetup.sh: ERROR: %s\n' "$*" >&2; exit 2; }
start=$(date +%s)

# --- Prerequisites -------------------------------------------------------
# Each check either finds a tool (and says which) or records what is missing, with the Debian
# packages that provide it and what to load on a cluster with environment modules.
MISSING=() APT=() MODULES=()
found() { printf '  %-16s %s\n' "$1" "$2"; }
lack() {  # what  apt-packages  module  why
  printf '  %-16s MISSING: %s\n' "$1" "$4"
  MISSING+=("$1")
  [ -n "$2" ] && APT+=($2)
  [ -n "$3" ] && MODULES+=("$3")
  return 0
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

say "checking prerequisites (horovod $HOROVOD_VERSION, flavour $FLAVOUR, MPI $([ "$WITH_MPI" = 1 ] && echo on || echo off))"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=${PYTHON:-python3}; fi
PYVER=""
if ! command -v "$PY" >/dev/null; then
  lack python "python3 python3-venv python3-dev" "python/3.11" "no '$PY' on PATH (Python 3.10-3.12; or set PYTHON=...)"
else
  PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  case "$PYVER" in
    3.10|3.11|3.12) found python "$(command -v "$PY") ($PYVER)" ;;
    *) lack python "" "python/3.11" "$PY is Python $PYVER; torch $TORCH_VERSION / horovod $HOROVOD_VERSION need 3.10-3.12 (set PYTHON=...)"; PYVER="" ;;
  esac
fi
if [ -n "$PYVER" ]; then
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if [ -f "$inc/Python.h" ]; then found "Python headers" "$inc/Python.h"
  else lack "Python headers" "python$PYVER-dev" "python/$PYVER" "no $inc/Python.h (Horovod's PyTorch extension includes it)"; fi
  if [ ! -x "$VENV/bin/python" ] && ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    lack "python venv" "python$PYVER-venv" "python/$PYVER" "$PY cannot create virtual environments (no ensurepip)"
  fi
fi

CXX=${CXX:-g++} CC=${CC:-gcc}
cxx_test='#include <concepts>
#include <span>
template <std::integral T> T twice(T x) { return 2 * x; }
int main() { int a[1] = {0}; return twice(std::span<int>(a)[0]); }'
if ! command -v "$CXX" >/dev/null; then
  lack "C++20 compiler" "g++" "gcc/12" "no '$CXX' on PATH (set CXX=...)"
elif ! printf '%s\n' "$cxx_test" | "$CXX" -std=c++20 -x c++ - -o /dev/null 2>/dev/null; then
  lack "C++20 compiler" "g++" "gcc/12" "'$CXX' ($("$CXX" -dumpfullversion 2>/dev/null || echo '?')) cannot compile -std=c++20 (torch's headers need it; gcc >= 10)"
else
  CXX=$(command -v "$CXX"); found "C++20 compiler" "$CXX ($("$CXX" -dumpfullversion 2>/dev/null || echo '?'))"
fi
if ! command -v "$CC" >/dev/null; then lack "C compiler" "gcc" "gcc/12" "no '$CC' on PATH (Gloo is C and C++; set CC=...)"
else CC=$(command -v "$CC"); found "C compiler" "$CC"; fi
export CXX CC  # CMake then uses exactly the compilers checked here (it would try `c++` first)

if command -v make >/dev/null; then found "build tool" "$(command -v make)"
elif command -v ninja >/dev/null; then export CMAKE_GENERATOR=Ninja; found "build tool" "$(command -v ninja) (no make)"
else lack "make" "make" "" "neither make nor ninja on PATH"; fi

# cmake: where none is new enough, one from PyPI goes into the venv (no root needed).
CMAKE_FROM_PIP=0
cmake_ver=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9.]*\).*/\1/p' || true)
if [ -n "$cmake_ver" ] && version_ge "$cmake_ver" "$CMAKE_MIN"; then
  found cmake "$(command -v cmake) ($cmake_ver)"
elif [ -z "$OFFLINE" ] || ls "$OFFLINE"/cmake-*.whl >/dev/null 2>&1; then
  CMAKE_FROM_PIP=1; found cmake "${cmake_ver:-none} on PATH (< $CMAKE_MIN): cmake from PyPI goes into the venv"
else
  lack cmake "cmake" "cmake" "cmake ${cmake_ver:-not found} (< $CMAKE_MIN) and no cmake wheel in $OFFLINE"
fi

if [ "$WITH_MPI" = 1 ]; then
  mpi_missing=()
  for t in mpicc mpirun; do command -v "$t" >/dev/null || mpi_missing+=("$t"); done
  if [ ${#mpi_missing[@]} -eq 0 ]; then
    found MPI "$(command -v mpicc), $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -n1))"
  else
    lack MPI "openmpi-bin libopenmpi-dev" "openmpi" "no ${mpi_missing[*]} on PATH (or HVD_MEGDET_MPI=0 for a Gloo-only build)"
  fi
fi

# CUDA toolkit: where torch's own CUDA_HOME lookup finds an nvcc, Horovod's CMake builds its CUDA
# kernels (even for the CPU flavour) and needs the real toolkit root, not a wrapper on PATH.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    d=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    [ -f "$d/include/cuda_runtime.h" ] && CUDA_HOME=$d
  fi
fi
NVCC_VER=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC_VER=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  found "CUDA toolkit" "$CUDA_HOME/bin/nvcc (CUDA $NVCC_VER)"
elif [ "$FLAVOUR" = nccl ]; then
  lack "CUDA toolkit" "" "cuda" "no nvcc at ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc (set CUDA_HOME to a toolkit of torch's CUDA major version)"
fi

if [ "$WITH_SLURM" = 1 ]; then
  slurm_missing=()
  for t in srun sbatch slurmctld slurmd munged; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || slurm_missing+=("$t")
  done
  if [ ${#slurm_missing[@]} -eq 0 ] && { [ "$NO_SYSTEM" = 1 ] || ! command -v dpkg-query >/dev/null \
      || dpkg-query -W -f='${Status}' libpmix-dev 2>/dev/null | grep -q "install ok installed"; }; then
    found SLURM "$(command -v srun)"
  else
    lack SLURM "slurmctld slurmd slurm-client munge libpmix-dev" "slurm" "no ${slurm_missing[*]:-PMIx (libpmix-dev)} (--slurm: local test cluster)"
  fi
  # scripts/local_cluster.sh (real hosts in namespaces): an sshd per node, ip, nsenter
  if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && PATH="$PATH:/usr/sbin:/sbin" command -v ip >/dev/null \
      && command -v nsenter >/dev/null; then
    found "local cluster" "/usr/sbin/sshd, $(command -v ssh), nsenter"
  else
    lack "local cluster" "openssh-server openssh-client iproute2 util-linux" "" "no sshd/ssh/ip/nsenter (--slurm: scripts/local_cluster.sh)"
  fi
fi

if [ ${#MISSING[@]} -gt 0 ]; then
  modules=$(printf '%s\n' ${MODULES[@]+"${MODULES[@]}"} | awk 'NF && !seen[$0]++' | tr '\n' ' ')
  apt_list=$(printf '%s\n' ${APT[@]+"${APT[@]}"} | awk 'NF && !seen[$0]++' | tr '\n' ' ')
  hint="missing: ${MISSING[*]}.
  On a cluster with environment modules, load them first, e.g.:  module load ${modules% }
  On Debian/Ubuntu, as root:  apt-get update && apt-get install -y ${apt_list% }
  then run this script again."
  if [ "$NO_SYSTEM" = 1 ] || [ "$CHECK_ONLY" = 1 ]; then
    user_error "$hint"
  fi
  [ -n "${HVD_MEGDET_SETUP_RECHECK:-}" ] && user_error "still missing after apt-get install: $hint"
  command -v apt-get >/dev/null || user_error "apt-get not found; $hint"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"
    else user_error "not root and no password-less sudo (or --no-system-packages to use only what PATH has); $hint"; fi
  fi
  say "installing system packages: $apt_list"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $apt_list >/dev/null
  HVD_MEGDET_SETUP_RECHECK=1 exec bash "$0" "$@"  # check again, with what was installed
fi

# --- Virtual environment ------------------------------------------------
venv_torch() {  # one import of torch: its version, CUDA version, torchvision's, NCCL's
  "$VPY" -c "import torch, torchvision
try: nccl = '.'.join(map(str, torch.cuda.nccl.version()))
except Exception: nccl = '?'
print(torch.__version__, torch.version.cuda or 'none', torchvision.__version__, nccl)" 2>/dev/null
}
VPY="$VENV/bin/python"
if [ "$CHECK_ONLY" = 1 ] && [ ! -x "$VPY" ]; then
  echo "  (no venv at $VENV yet: torch's CUDA version and NCCL are checked after torch is installed)"
  echo "prerequisites ok"; exit 0
fi
if [ ! -x "$VPY" ]; then
  say "creating $VENV"
  # offline, the interpreter's own packages (torch) must stay visible
  "$PY" -m venv $([ -n "$OFFLINE" ] && echo --system-site-packages) "$VENV"
fi
# pip install, without the warnings some machines' pip config prints for every package
pip_install() {
  "$VPY" -m pip install -q --disable-pip-version-check ${OFFLINE:+--no-index --find-links "$OFFLINE"} "$@" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
if [ "$CHECK_ONLY" = 0 ]; then
  if [ -n "$OFFLINE" ]; then
    venv_torch >/dev/null || user_error "HVD_MEGDET_OFFLINE: torch and torchvision must already be importable by $VPY"
  elif ! "$VPY" -c "import torch, torchvision; assert torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (large; taken from the local wheel cache when present)"
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  say "installing Python dependencies"
  if [ -n "$OFFLINE" ]; then
    # what the machine lacks travels as wheels (--no-deps: its own packages stay as they are)
    wheels=$(ls "$OFFLINE"/*.whl 2>/dev/null | grep -v -e '/cmake-' -e '/horovod-' -e '/wheel-' || true)
    [ -z "$wheels" ] || pip_install --no-deps $wheels
    "$VPY" -c "import pycocotools, omegaconf, yaml, tensorboard" \
      || user_error "HVD_MEGDET_OFFLINE: a requirement above is not importable by $VPY: put its wheel in $OFFLINE"
  else
    pip_install -r "$REPO/requirements.txt"
  fi
  [ "$CMAKE_FROM_PIP" = 1 ] && pip_install "cmake>=3.18,<4"
fi
read -r TORCH_FULL TORCH_CUDA TV_FULL TORCH_NCCL < <(venv_torch || echo "none none none none")
[ "$TORCH_FULL" = none ] && { echo "  (torch not installed in $VENV yet: CUDA/NCCL checks follow its install)"; echo "prerequisites ok"; exit 0; }
found torch "$TORCH_FULL (CUDA $TORCH_CUDA), torchvision $TV_FULL"

# --- CUDA and NCCL for the build (checked before anything is built) -----
if [ "$FLAVOUR" = nccl ]; then
  [ "$TORCH_CUDA" = none ] && user_error "HVD_MEGDET_GPU=1 but torch $TORCH_FULL is a CPU-only build"
  [ "${NVCC_VER%%.*}" = "${TORCH_CUDA%%.*}" ] || user_error "CUDA toolkit $CUDA_HOME/bin/nvcc is CUDA $NVCC_VER but torch $TORCH_FULL was built for CUDA $TORCH_CUDA: the major versions must match. Point CUDA_HOME at a CUDA ${TORCH_CUDA%%.*}.x toolkit (e.g. module load cuda/${TORCH_CUDA%%.*})"
elif [ -n "$NVCC_VER" ] && [ "$TORCH_CUDA" != none ] && [ "${NVCC_VER%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  echo "  WARNING: CUDA toolkit $NVCC_VER (CUDA_HOME=$CUDA_HOME) vs torch's CUDA $TORCH_CUDA: Horovod's CUDA kernels are built with the toolkit"
fi
NCCL_VER=""
if [ "$FLAVOUR" = nccl ]; then
  # NCCL headers and library: HOROVOD_NCCL_HOME (e.g. a module's NCCL), else the nvidia-nccl wheel that
  # torch's CUDA build installed. Horovod's FindNCCL searches HOROVOD_NCCL_HOME, then the CUDA toolkit
  # root, then HOROVOD_NCCL_INCLUDE/LIB, and an NCCL_ROOT in the environment before all of them; so
  # all three point at one prefix, NCCL_ROOT is dropped, and the build log is checked afterwards.
  if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then NCCL_SRC=$HOROVOD_NCCL_HOME
  else NCCL_SRC=$("$VPY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null) \
    || user_error "no NCCL: torch's nvidia-nccl wheel is not in $VENV; install it or set HOROVOD_NCCL_HOME"
  fi
  NCCL_H="$NCCL_SRC/include/nccl.h"
  NCCL_SO=$(ls "$NCCL_SRC"/lib/libnccl.so "$NCCL_SRC"/lib/libnccl.so.2 "$NCCL_SRC"/lib64/libnccl.so 2>/dev/null | head -n1 || true)
  [ -f "$NCCL_H" ] && [ -n "$NCCL_SO" ] || user_error "NCCL at $NCCL_SRC: expected include/nccl.h and lib/libnccl.so[.2]"
  NCCL_VER=$(awk '/^#define NCCL_(MAJOR|MINOR|PATCH) /{v = v (v ? "." : "") $3} END {print v}' "$NCCL_H")
  found NCCL "$NCCL_SRC ($NCCL_VER; torch's: $TORCH_NCCL)"
  [ "$NCCL_VER" = "$TORCH_NCCL" ] || echo "  WARNING: Horovod is built against NCCL $NCCL_VER, torch loads $TORCH_NCCL: one process loads one libnccl.so.2 (torch's, imported first)"
fi
MPI_TAG=nompi
if [ "$WITH_MPI" = 1 ]; then
  mpi_line=$(mpirun --version 2>&1 | head -n3 | tr '\n' ' ')
  case "$mpi_line" in
    *"Open MPI"*|*OpenRTE*) MPI_TAG=openmpi$(echo "$mpi_line" | grep -o '[0-9][0-9.]*' | head -n1) ;;
    *"Intel(R) MPI"*) MPI_TAG=impi$(echo "$mpi_line" | grep -o '[0-9][0-9.]*' | head -n1) ;;
    *HYDRA*|*MPICH*) MPI_TAG=mpich$(mpichversion 2>/dev/null | grep -o '[0-9][0-9.]*' | head -n1 || true) ;;
    *) MPI_TAG=mpi-$(echo "$mpi_line" | cksum | cut -d' ' -f1) ;;
  esac
fi
# Everything the wheel depends on: a shared $HOME must never hand one machine's build to another.
KEY="horovod-$HOROVOD_VERSION$PATCHES-$FLAVOUR-py$PYVER-torch$TORCH_FULL-cuda${NVCC_VER:-none}"
[ -n "$NCCL_VER" ] && KEY+="-nccl$NCCL_VER"
KEY+="-$MPI_TAG"
[ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ] && KEY+="-cc${HOROVOD_BUILD_CUDA_CC_LIST//,/.}"
found "cache key" "$KEY"
if [ "$CHECK_ONLY" = 1 ]; then echo "prerequisites ok"; exit 0; fi

# --- Horovod (built once per key, cached) -------------------------------
WHEELDIR="$CACHE/wheels/$KEY"
STAMP="$VENV/.hvd_megdet_horovod"  # the key of the installed build
if "$VPY" -c "import horovod, horovod.torch as h; assert horovod.__version__ == '$HOROVOD_VERSION'; \
assert bool(h.nccl_built()) == ('$FLAVOUR' == 'nccl') and bool(h.mpi_built()) == ('$WITH_MPI' == '1')" 2>/dev/null \
   && { [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" = "$KEY" ]; }; then
  # (no stamp: installed by an earlier setup.sh that recorded no key; the flavour matches)
  say "horovod $HOROVOD_VERSION ($FLAVOUR) already installed ($(cat "$STAMP" 2>/dev/null || echo "no build key recorded"))"
else
  if "$VPY" -c "import horovod" 2>/dev/null; then
    say "the installed horovod is not the build $KEY: replacing it"
  fi
  if ! ls "$WHEELDIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building horovod $HOROVOD_VERSION ($KEY) from source: ~6 minutes on 2 cores, once"
    BUILD=$(mktemp -d)
    LOG="$CACHE/horovod-build-$KEY.log"
    mkdir -p "$CACHE"
    if [ -n "$OFFLINE" ]; then
      cp "$OFFLINE/horovod-$HOROVOD_VERSION.tar.gz" "$BUILD/" || user_error "HVD_MEGDET_OFFLINE: no horovod-$HOROVOD_VERSION.tar.gz in $OFFLINE"
    else
      "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION" \
        2> >(grep -v "is ignored: it is neither" >&2)
    fi
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
    # Python 3.12 has no distutils; horovodrun imports this module at start
    sed -i 's/^from distutils.spawn import find_executable$/from shutil import which as find_executable/' \
      "$SRC/horovod/runner/js_run.py"
    # --no-build-isolation builds with the venv's own setuptools, which needs `wheel` below 70.1
    "$VPY" -c "import setuptools.command.bdist_wheel" 2>/dev/null || "$VPY" -c "import wheel" 2>/dev/null \
      || pip_install wheel || user_error "no 'wheel' package for $VPY${OFFLINE:+ (put its wheel in $OFFLINE)}"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
    if [ "$WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    export MAKEFLAGS="-j$(nproc)"
    # gloo's CMakeLists asks for CMake 2.8.12, which CMake >= 4 refuses without this
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    export PATH="$VENV/bin:$PATH"  # a cmake from PyPI, if one was installed above
    if [ "$FLAVOUR" = nccl ]; then
      export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
      # one private prefix (the wheel ships only libnccl.so.2; CMake looks for libnccl.so)
      mkdir -p "$BUILD/nccl/lib"
      ln -s "$(dirname "$NCCL_H")" "$BUILD/nccl/include"
      ln -s "$NCCL_SO" "$BUILD/nccl/lib/libnccl.so"
      export HOROVOD_NCCL_HOME="$BUILD/nccl" HOROVOD_NCCL_INCLUDE="$BUILD/nccl/include" HOROVOD_NCCL_LIB="$BUILD/nccl/lib"
      unset NCCL_ROOT
    fi
    if [ -n "$NVCC_VER" ]; then
      # A CUDA build of torch makes Horovod's CMake build CUDA kernels even for CPU collectives: point
      # it at the toolkit's root (an nvcc found first on PATH, e.g. /usr/local/bin, hides the headers).
      export CUDA_HOME HOROVOD_CUDA_HOME="$CUDA_HOME" CUDACXX="$CUDA_HOME/bin/nvcc" CUDAToolkit_ROOT="$CUDA_HOME" \
             PATH="$CUDA_HOME/bin:$PATH"
    fi
    [ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ] && export HOROVOD_BUILD_CUDA_CC_LIST
    build_start=$(date +%s)
    if ! (cd "$SRC" && "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$BUILD/dist" . ) >"$LOG" 2>&1; then
      tail -n 30 "$LOG" >&2
      die "horovod build failed; full log: $LOG (see README 'Troubleshooting')"
    fi
    if [ "$FLAVOUR" = nccl ]; then
      # the NCCL CMake found must be the one chosen above (FindNCCL's search order, see above)
      line=$(grep -m1 "Found NCCL (include:" "$LOG" || true)
      echo "  $line"
      case "$line" in
        *"include: $HOROVOD_NCCL_INCLUDE, library: $HOROVOD_NCCL_LIB/"*) ;;
        *) die "horovod's CMake did not use the NCCL at $NCCL_SRC (${line:-no Found-NCCL line}); log: $LOG" ;;
      esac
    fi
    mkdir -p "$WHEELDIR"
    cp "$BUILD"/dist/horovod-*.whl "$WHEELDIR/"
    { echo "key: $KEY"; echo "built: $(date -u +%FT%TZ) on $(hostname) in $(( $(date +%s) - build_start ))s"
      echo "python: $VPY ($PYVER)"; echo "torch: $TORCH_FULL (CUDA $TORCH_CUDA)"
      echo "cxx: $CXX $("$CXX" -dumpfullversion 2>/dev/null)"; echo "cmake: $(cmake --version | head -n1)"
      echo "cuda: ${CUDA_HOME:-none} ${NVCC_VER:-}"; echo "cc list: ${HOROVOD_BUILD_CUDA_CC_LIST:-all that nvcc knows}"
      echo "nccl: ${NCCL_SRC:-none} ${NCCL_VER:-}"; echo "mpi: $MPI_TAG ${mpi_line:-}"; } > "$WHEELDIR/build-info.txt"
    rm -rf "$BUILD"
    echo "cached wheel in $WHEELDIR (build log $LOG)"
  fi
  say "installing horovod from $WHEELDIR"
  pip_install --no-deps --force-reinstall "$WHEELDIR"/horovod-*.whl
  # horovod's runtime deps (its metadata's cffi is never imported: only online)
  pip_install cloudpickle psutil pyyaml packaging $([ -z "$OFFLINE" ] && echo cffi)
  echo "$KEY" > "$STAMP"
fi

# --- The project --------------------------------------------------------
say "installing hvd_megdet (editable)"
pip_install --no-deps --no-build-isolation -e "$REPO"

say "horovodrun --check-build"
"$VENV/bin/horovodrun" --check-build
echo "setup done in $(( $(date +%s) - start ))s; activate with: source $VENV/bin/activate"
