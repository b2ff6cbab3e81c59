#!/usr/bin/env bash
# Check one GPU node before a cluster job: build Horovod there (Gloo + NCCL, no MPI) from what
# build/gpu_check/ carries (the node needs no network), then measure what a MegDet job depends on,
# each step under its own time limit, all within --deadline, into DIR/gpu.json (rewritten after every
# step: a run cut short keeps what it measured) and DIR/gpu_logs.tar.gz.
#
#   bash scripts/gpu_check.sh --prepare           a machine with network: fill build/gpu_check/ (~4 MB)
#   bash scripts/gpu_check.sh [--out DIR]         the GPU node, with build/gpu_check/ copied beside the repo
#   bash scripts/gpu_check.sh --rehearse          any CPU machine: the same steps, tiny sizes, the same JSON
#   bash scripts/gpu_check.sh --rehearse-install  a machine with network: the node's deps + install steps in a
#                                                 Python $NODE_PYTHON venv with torch $NODE_TORCH / torchvision
#                                                 $NODE_TORCHVISION (what the node has), timed
#
# Steps, in this order (expected seconds / limit on an H100-class node; README "Checking a GPU node"):
#   deps 5/20  facts 10/25  kernels 10/20  peer 40/65  install 120/200  syncbn 25/45  megdet 80/110
#   megdet_sync 25/30  shapes_tiny 20/25  -- limits sum to 540 s. kernels (torch's fused BN kernels) and
#   the peer (torchvision's own model) need no Horovod and run before the install. A step starts only if
#   its whole limit fits in what is left of the deadline.
# Options: --out DIR (default $OUT if set, else outputs/gpu_check), --only a,b / --skip a,b (steps),
#          --deadline S (default 540)
# Environment: GPU_CHECK_PYTHON (the node's interpreter with torch; default python3), GPU_CHECK_WORK
#          (work folder; default a new /tmp/gpu_check.*), GPU_CHECK_CARRY (default build/gpu_check),
#          GPU_CHECK_LIMIT_SCALE (an integer multiplying every limit and the deadline; default 1, --rehearse 4:
#          this machine's tiny steps still outlast a GPU's), GPU_CHECK_FORCE=1 (install even where
#          torch sees no GPU), HOROVOD_BUILD_CUDA_CC_LIST (default: the GPU's own capability),
#          GPU_CHECK_SIZES=tiny (the rehearsal's sizes on a node: --rehearse-install uses it).
# Exit: 0 when every step that ran is ok, 1 otherwise (gpu.json says which), 2 bad option.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CHECK_CARRY:-$REPO/build/gpu_check}  # ignored by git (/build/): copy it to the node with the repo
# What the node lacks, as wheels for its Python (the rest -- torch, torchvision, numpy, pillow, pyyaml,
# tqdm, tensorboard, cmake, setuptools -- it has); and the node's versions that --rehearse-install copies.
WHEELS="pycocotools==2.0.11 omegaconf==2.4.0 wheel==0.45.1"
HOROVOD_VERSION=0.28.1
NODE_PYTHON=3.12 NODE_TORCH=2.11.0 NODE_TORCHVISION=0.26.0
NODE_PACKAGES="numpy pillow pyyaml tqdm tensorboard matplotlib setuptools wheel cmake ninja packaging psutil cloudpickle"
MODE=device OUT_DIR=${OUT:-} ONLY="" SKIP="" DEADLINE=540
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --rehearse) MODE=rehearse ;;
    --rehearse-install) MODE=rehearse-install ;;
    --out) OUT_DIR=$2; shift ;;
    --only) ONLY=",$2," ; shift ;;
    --skip) SKIP=",$2," ; shift ;;
    --deadline) DEADLINE=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

pip_python() {  # an interpreter with pip: $PYTHON, the repo's venv, python3 (a fresh clone has no venv)
  local p
  for p in ${PYTHON:-} "$REPO/.venv/bin/python" python3 python3.12 python3.11; do
    command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1 && { echo "$p"; return 0; }
  done
  echo "gpu_check.sh: no Python with pip found (set PYTHON=...)" >&2
  return 1
}

if [ "$MODE" = prepare ]; then
  set -e
  PIP="$(pip_python) -m pip"
  mkdir -p "$CARRY"
  $PIP download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$CARRY" "horovod==$HOROVOD_VERSION"
  # shellcheck disable=SC2086
  $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$NODE_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY" $WHEELS
  ls -la "$CARRY"; du -sh "$CARRY"
  exit 0
fi

if [ "$MODE" = rehearse-install ]; then
  # The node's Python and torch, here: a venv kept in the cache (downloads once), then the node's own
  # deps + install steps (device mode, forced: no GPU here) into a fresh work folder and wheel cache.
  set -e
  NODE_VENV=${GPU_CHECK_REHEARSE_VENV:-${HVD_MEGDET_CACHE:-$HOME/.cache/hvd_megdet}/node-rehearsal-py$NODE_PYTHON-torch$NODE_TORCH}
  if ! "$NODE_VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('$NODE_TORCH')" 2>/dev/null; then
    PYN=${NODE_PYTHON_BIN:-python$NODE_PYTHON}
    command -v "$PYN" >/dev/null || { echo "gpu_check.sh: no $PYN here (set NODE_PYTHON_BIN=...)" >&2; exit 2; }
    echo "[gpu_check] creating $NODE_VENV (Python $NODE_PYTHON, torch $NODE_TORCH, torchvision $NODE_TORCHVISION)"
    "$PYN" -m venv "$NODE_VENV"
    # shellcheck disable=SC2086
    "$NODE_VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$NODE_TORCH" \
      "torchvision==$NODE_TORCHVISION" $NODE_PACKAGES
  fi
  [ -f "$CARRY/horovod-$HOROVOD_VERSION.tar.gz" ] || bash "$0" --prepare
  # as a node comes: none of what its run installs (an earlier rehearsal's Horovod, the carried wheels)
  "$NODE_VENV/bin/python" -m pip uninstall -y -q horovod hvd_megdet pycocotools omegaconf 2>/dev/null || true
  set +e
  W=$(mktemp -d /tmp/gpu_check_rehearse_install.XXXXXX)
  # limits x10: this machine's cores build Horovod far slower than a GPU node's
  GPU_CHECK_LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-10} GPU_CHECK_FORCE=1 GPU_CHECK_PYTHON="$NODE_VENV/bin/python" GPU_CHECK_WORK="$W" HVD_MEGDET_CACHE="$W/cache" \
    HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-90} GPU_CHECK_SIZES=tiny \
    bash "$0" --out "${OUT_DIR:-$REPO/outputs/gpu_check_rehearse_install}" --only deps,facts,kernels,peer,install,syncbn \
    --deadline "${GPU_CHECK_REHEARSE_DEADLINE:-540}"
  rc=$?
  rm -rf "$W"
  exit $rc
fi

cd "$REPO"
if [ "$MODE" = rehearse ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  # the node's build has no MPI: run the same (single-process) Gloo controller here
  export HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo
else
  PY=${GPU_CHECK_PYTHON:-python3}
  # it installs into that interpreter: never by mistake on a workstation without a GPU
  if [ -z "${GPU_CHECK_FORCE:-}" ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check.sh: $PY sees no usable CUDA GPU: use --rehearse here (GPU_CHECK_FORCE=1 to install anyway)" >&2
    exit 2
  fi
fi

T0=$(date +%s)
OUT_DIR=${OUT_DIR:-$REPO/outputs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
LOGS=$WORK/logs FIG=$WORK/figures
mkdir -p "$LOGS" "$FIG"
JSON=$OUT_DIR/gpu.json
rm -f "$JSON"
export HVD_MEGDET_CACHE=${HVD_MEGDET_CACHE:-$WORK/cache} PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RECPY=python3                        # stdlib only: records even when torch/horovod are broken
command -v "$RECPY" >/dev/null || RECPY=$PY
STEP=$REPO/scripts/experiments/benchmark_gpu_step.py

# name:expected:limit (seconds, on the node; the rehearsal's tiny sizes take less, its install more)
PLAN="deps:5:20 facts:10:25 kernels:10:20 peer:40:65 install:120:200 syncbn:25:45 megdet:80:110 megdet_sync:25:30
shapes_tiny:20:25"
SCALE=${GPU_CHECK_LIMIT_SCALE:-$([ "$MODE" = rehearse ] && echo 4 || echo 1)}
[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: GPU_CHECK_LIMIT_SCALE must be a positive integer" >&2; exit 2; }
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
"$RECPY" "$STEP" meta --json "$JSON" --set "{\"mode\": \"$MODE\", \"host\": \"$(hostname)\", \
\"commit\": \"$commit\", \"started\": \"$(date -u +%FT%TZ)\", \"deadline_s\": $DEADLINE, \"limit_scale\": $SCALE, \
\"plan\": \"$(echo $PLAN)\", \
\"steps_planned\": \"$(for p in $PLAN; do printf '%s ' "${p%%:*}"; done)\"}"

wanted() {
  [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]] || return 1
  [[ "$SKIP" != *",$1,"* ]]
}
FAILED=0
step() {  # step NAME CMD... : runs CMD under NAME's limit if it fits; the command writes $FIG/NAME.json
  local name=$1 rc=0 entry limit left
  shift
  wanted "$name" || return 0
  entry=$(for p in $PLAN; do [ "${p%%:*}" = "$name" ] && echo "$p"; done)
  limit=$(( ${entry##*:} * SCALE ))
  left=$(( DEADLINE * SCALE - ($(date +%s) - T0) ))
  if [ "$limit" -gt "$left" ]; then  # no step starts that cannot finish
    "$RECPY" "$STEP" record --json "$JSON" --step "$name" --rc 125 --seconds 0 \
      --why "skipped: its limit (${limit}s) exceeds what is left of the $((DEADLINE * SCALE))s deadline (${left}s)"
    return 0
  fi
  echo "[gpu_check] $name: start (limit ${limit}s, ${left}s left)"
  local t=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || FAILED=1
  "$RECPY" "$STEP" record --json "$JSON" --step "$name" --rc "$rc" --figures "$FIG/$name.json" \
    --log "$LOGS/$name.log" --seconds "$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
}

# --- sizes: the node's, or tiny ones for the CPU rehearsal -------------------------------------
if [ "$MODE" = rehearse ] || [ "${GPU_CHECK_SIZES:-}" = tiny ]; then
  BN_IMAGE=64x96 BN_ITERS=1 BN_LAYERS=12 LAT_ITERS=5 WARMUP=1 PEER_ITERS=2 PEER_WARMUP=1
  VARIANTS=syncbn_plain,bn,frozen SYNC_VARIANTS=syncbn_plain
  SHAPES_DATA="data.shapes_train=16 data.shapes_val=4 data.shapes_image_size=64 data.min_size=64 data.max_size=64"
  SHAPES_RUN="solver.max_iter=4 solver.steps=[2,3] solver.warmup_iters=1 train.log_period=1 train.checkpoint_period=2"
  SHAPES_MORE="solver.max_iter=6"
  MEGDET_DATA="data.shapes_train=8 data.shapes_val=2 data.shapes_image_size=64 data.shapes_width=96 data.min_size=64
  data.max_size=96 data.workers=0"
  MEGDET_RUN="solver.max_iter=4 solver.steps=[3] solver.warmup_iters=0"
else
  # COCO's images resized by megdet_r50_fpn: 800 x ~1216 (800 x 1333 at most)
  BN_IMAGE=800x1216 BN_ITERS=10 BN_LAYERS=0 LAT_ITERS=200 WARMUP=10 PEER_ITERS=10 PEER_WARMUP=5
  VARIANTS=syncbn_plain,syncbn_fused,bn,frozen,syncbn_plain_amp,syncbn_fused_amp,bn_amp,frozen_amp
  SYNC_VARIANTS=syncbn_plain,syncbn_fused
  SHAPES_DATA=""
  SHAPES_RUN="solver.max_iter=60 solver.steps=[40,50] solver.warmup_iters=10 train.log_period=10 train.checkpoint_period=30"
  SHAPES_MORE="solver.max_iter=80"
  MEGDET_DATA="data.shapes_train=32 data.shapes_val=2 data.shapes_image_size=800 data.shapes_width=1216 data.min_size=800
  data.max_size=1333 data.workers=4"
  MEGDET_RUN="solver.max_iter=22 solver.steps=[20] solver.warmup_iters=2"
fi
# shapes_tiny as given, except the schedule (literal iterations at np=1) and the data size
SHAPES="solver.scale_schedule=false $SHAPES_DATA"
# megdet_r50_fpn (ResNet-50-FPN, 2 images/GPU, SyncBN) on generated shapes: a node has no COCO and no
# network, so random backbone weights (model.backbone_weights is empty in the config)
MEGDET="data.dataset=shapes data.root=$WORK/shapes-megdet data.train_images=train
data.train_annotations=annotations/instances_train.json data.val_images=val
data.val_annotations=annotations/instances_val.json $MEGDET_DATA solver.scale_schedule=false $MEGDET_RUN
train.log_period=1 train.checkpoint_period=100000 train.checkpoint_minutes=0 train.eval_period=100000"
# train.device=cuda|cpu (what this run has) is added by benchmark_gpu_step.py

# --- where the node's packages go --------------------------------------------------------------
if [ "$MODE" = rehearse ]; then
  VENV=""
else
  # Into the node's own Python (a lent node is discarded afterwards); a venv seeing its packages
  # where that is not writable.
  VENV=$("$PY" -c 'import sys; print(sys.prefix)')
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ ! -w "$SITE" ] || [ ! -x "$VENV/bin/python" ]; then
    VENV=$WORK/venv
    "$PY" -m venv "$VENV" && echo "$SITE" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_check_base.pth"
  fi
  PY=$VENV/bin/python
fi
export PY STEP FIG

# --- 1-4. deps, facts, the fused kernels, the peer: nothing of Horovod needed ---------------------------------------
if [ "$MODE" = rehearse ]; then
  step deps "$PY" -c "import pycocotools, omegaconf, torchvision; print('deps importable')"
else
  # shellcheck disable=SC2046
  step deps "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    $(ls "$CARRY"/*.whl 2>/dev/null | grep -v -e '/horovod-' -e '/wheel-')
fi
step facts "$PY" "$STEP" facts --out "$FIG/facts.json"
step kernels "$PY" "$STEP" kernels --out "$FIG/kernels.json" --image "$BN_IMAGE"
# shellcheck disable=SC2086
step peer "$PY" "$STEP" peer --out "$FIG/peer.json" --output-dir "$WORK/peer" --iters "$PEER_ITERS" \
  --warmup "$PEER_WARMUP" --config megdet_r50_fpn $MEGDET

# --- 5. install -----------------------------------------------------------------------------------
if [ "$MODE" = rehearse ]; then
  # the build itself takes minutes here: rehearse setup.sh's checks for the node's flavour (NCCL
  # where this machine has a CUDA toolkit) against the .venv's Horovod, not the build
  gpu=0
  { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || command -v nvcc >/dev/null; } && gpu=1
  step install env HVD_MEGDET_GPU=$gpu HVD_MEGDET_MPI=0 HVD_MEGDET_VENV="$("$PY" -c 'import sys; print(sys.prefix)')" \
    bash scripts/setup.sh --check-only
else
  # CUDA kernels for this GPU only (all of nvcc's would take minutes more)
  CC_LIST=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 90)
  step install env HVD_MEGDET_OFFLINE="$CARRY" HVD_MEGDET_GPU=1 HVD_MEGDET_MPI=0 HVD_MEGDET_VENV="$VENV" \
    HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-$CC_LIST}" bash scripts/setup.sh
fi
[ -f "$LOGS/install.log" ] && "$RECPY" "$STEP" setup-figures --json "$JSON" --log "$LOGS/install.log"

# --- 6-8. SyncBN; the megdet_r50_fpn training step; async completion off ---------------------
step syncbn "$PY" "$STEP" syncbn --out "$FIG/syncbn.json" --image "$BN_IMAGE" --iters "$BN_ITERS" --layers "$BN_LAYERS"
# shellcheck disable=SC2086
step megdet "$PY" "$STEP" megdet --out "$FIG/megdet.json" --output-dir "$WORK/megdet" --variants "$VARIANTS" \
  --warmup "$WARMUP" --latency-iters "$LAT_ITERS" --config megdet_r50_fpn $MEGDET
# shellcheck disable=SC2086
step megdet_sync env HOROVOD_ENABLE_ASYNC_COMPLETION=0 "$PY" "$STEP" megdet --out "$FIG/megdet_sync.json" \
  --output-dir "$WORK/megdet_sync" --variants "$SYNC_VARIANTS" --warmup "$WARMUP" --latency-iters "$LAT_ITERS" \
  --config megdet_r50_fpn $MEGDET

# --- 9. shapes_tiny on the device: train with evaluation and checkpoints, resume, eval-only -------
ST=$WORK/shapes_tiny
shapes_tiny() {
  set -e
  for run in train resume eval_only; do
    case $run in
      train) args=() ;;
      resume) args=(--resume) ;;
      eval_only) args=(--eval-only) ;;
    esac
    # shellcheck disable=SC2086
    "$PY" scripts/train.py --output-dir "$ST" ${args[@]+"${args[@]}"} $SHAPES $SHAPES_RUN ${args[@]+$SHAPES_MORE}
    "$PY" "$STEP" run-figures --out "$FIG/shapes_tiny_$run.json" --output-dir "$ST"
  done
  "$PY" -c "import json, sys; d = sys.argv[1]; json.dump({r: json.load(open(f'{d}/shapes_tiny_{r}.json'))
    for r in ('train', 'resume', 'eval_only')}, open(f'{d}/shapes_tiny.json', 'w'))" "$FIG"
}
export -f shapes_tiny
export ST SHAPES SHAPES_RUN SHAPES_MORE
step shapes_tiny bash -c shapes_tiny

# --- logs back (checkpoints stay behind) -------------------------------------------------------
tar -czf "$OUT_DIR/gpu_logs.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='*.jpg' --exclude='tensorboard' \
  --exclude='*.png' --exclude='shapes-*' --exclude='venv' --exclude='detections.json' logs figures \
  $(cd "$WORK" && ls -d cache/*.log shapes_tiny megdet megdet_sync 2>/dev/null) 2>/dev/null || true
"$RECPY" "$STEP" meta --json "$JSON" --set "{\"total_s\": $(( $(date +%s) - T0 )), \"finished\": \"$(date -u +%FT%TZ)\"}"
echo "[gpu_check] done in $(( $(date +%s) - T0 ))s: $JSON"
[ -n "${GPU_CHECK_WORK:-}" ] || [ "$MODE" != rehearse ] || rm -rf "$WORK"
exit $FAILED
