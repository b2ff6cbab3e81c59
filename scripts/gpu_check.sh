#!/usr/bin/env bash
# The GPU check: one prepared run on a bare one-GPU machine (its own Python 3.12 and torch, no
# network, minutes of time). Builds Horovod there (Gloo + NCCL, no MPI) with scripts/setup.sh from
# what build/gpu_check carries, then runs every step in order, each guarded by its own time limit
# so that one failure loses nothing else, into $OUT/gpu.json (rewritten after every step) and
# $OUT/gpu_logs.tar.gz:
#   install facts syncbn allreduce_latency
#   shapes_tiny shapes_tiny_amp shapes_tiny_amp_clip shapes_tiny_resume shapes_tiny_eval_only
#   megdet_syncbn_fp32 megdet_syncbn_amp megdet_bn_fp32 megdet_bn_amp torchvision_peer_fp32 torchvision_peer_amp
#
#   bash scripts/gpu_check.sh --prepare          here (network): fill build/gpu_check/ to carry
#   bash scripts/gpu_check.sh                    on the GPU machine (carry: build/gpu_check)
#   bash scripts/gpu_check.sh --rehearse         here, on the CPU: same steps, tiny sizes, same JSON
# Options: --out DIR (default $OUT, else outputs/gpu_check), --only a,b / --skip a,b (steps),
#          --deadline S (no step starts later than S seconds after the start; default 560, rehearse 540)
# Environment: GPU_CHECK_PYTHON (the machine's interpreter with torch; default python3),
#          GPU_CHECK_WORK (work folder; default a new /tmp/gpu_check.*), GPU_CHECK_CARRY (default
#          build/gpu_check), GPU_CHECK_LIMIT_SCALE (multiplies every step's time limit; default 1),
#          HOROVOD_BUILD_CUDA_CC_LIST.
# Exit: 0 when every step that ran is ok, 1 otherwise (gpu.json says which), 2 bad option.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CHECK_CARRY:-$REPO/build/gpu_check}  # ignored by git (/build/); what the device run carries
PYCOCOTOOLS=2.0.11 OMEGACONF=2.4.0   # the versions in .venv; the GPU machine's image lacks both
WHEEL=0.45.1                         # installed there only if its setuptools needs it to build
HOROVOD_VERSION=0.28.1
MODE=device OUT_DIR=${OUT:-} ONLY="" SKIP="" DEADLINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --rehearse) MODE=rehearse ;;
    --out) OUT_DIR=$2; shift ;;
    --only) ONLY=",$2," ; shift ;;
    --skip) SKIP=",$2," ; shift ;;
    --deadline) DEADLINE=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = prepare ]; then
  # Wheels for what the GPU machine's image lacks (see /work/.library/device/KINDS.md: it has torch,
  # torchvision, cmake, ninja, mpi4py, pyyaml, tensorboard, ...), for its Python 3.12, plus
  # horovod's sdist. ~4 MB in all; the run carries the folder (limit 64 MiB with the tree).
  set -e
  mkdir -p "$CARRY"
  PIP="${PYTHON:-$REPO/.venv/bin/python} -m pip"
  $PIP download -q --no-deps --no-binary :all: -d "$CARRY" "horovod==$HOROVOD_VERSION"
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY" "pycocotools==$PYCOCOTOOLS" "omegaconf==$OMEGACONF" "wheel==$WHEEL"
  ls -la "$CARRY"; du -sh "$CARRY"
  exit 0
fi

cd "$REPO"
if [ "$MODE" = rehearse ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  DEADLINE=${DEADLINE:-540}
  # the GPU machine's build has no MPI: run the same (single-process) Gloo controller here
  export HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo
else
  PY=${GPU_CHECK_PYTHON:-python3}
  DEADLINE=${DEADLINE:-560}
  # it installs into that interpreter: never by mistake on a workstation (on the GPU machine the
  # device tool sets OUT; a GPU that torch cannot use is then a finding, recorded step by step)
  if [ -z "${OUT:-}" ] && [ -z "${GPU_CHECK_FORCE:-}" ] && \
      ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
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
export HVD_MEGDET_CACHE=$WORK/cache PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RECPY=python3                        # stdlib only: records even when torch/horovod are broken
command -v "$RECPY" >/dev/null || RECPY=$REPO/.venv/bin/python
STEP=$REPO/scripts/experiments/benchmark_gpu_step.py

STEPS="install facts syncbn allreduce_latency shapes_tiny shapes_tiny_amp shapes_tiny_amp_clip shapes_tiny_resume
shapes_tiny_eval_only megdet_syncbn_fp32 megdet_syncbn_amp megdet_bn_fp32 megdet_bn_amp torchvision_peer_fp32
torchvision_peer_amp"
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
"$RECPY" "$STEP" meta --json "$JSON" --set "{\"mode\": \"$MODE\", \"host\": \"$(hostname)\", \
\"commit\": \"$commit\", \"started\": \"$(date -u +%FT%TZ)\", \"deadline_s\": $DEADLINE, \
\"steps_planned\": \"$(echo $STEPS)\"}"

wanted() {
  [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]] || return 1
  [[ "$SKIP" != *",$1,"* ]]
}
FAILED=0
step() {  # step NAME LIMIT_S CMD... : runs CMD with a time limit; the command writes $FIG/NAME.json
  local name=$1 limit=$(( $2 * ${GPU_CHECK_LIMIT_SCALE:-1} )) rc=0
  shift 2
  wanted "$name" || return 0
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 15 ]; then
    "$RECPY" "$STEP" record --json "$JSON" --step "$name" --rc 125 --seconds 0 \
      --why "skipped: the deadline (${DEADLINE}s after the start) has passed"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name: start (limit ${limit}s)"
  local t=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || FAILED=1
  "$RECPY" "$STEP" record --json "$JSON" --step "$name" --rc "$rc" --figures "$FIG/$name.json" \
    --log "$LOGS/$name.log" --seconds "$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
}

# --- sizes: the GPU machine's, or tiny ones for the CPU rehearsal -------------------------------
if [ "$MODE" = rehearse ]; then
  BN_IMAGE=64x96 BN_ITERS=1 BN_LAYERS=12 AR_ITERS=20 PEER_ITERS=2
  SHAPES_DATA="data.shapes_train=16 data.shapes_val=4 data.shapes_image_size=64 data.min_size=64 data.max_size=64"
  SHAPES_RUN="solver.max_iter=4 solver.steps=[2,3] solver.warmup_iters=1 train.log_period=1 train.checkpoint_period=2"
  SHAPES_MORE="solver.max_iter=6"
  MEGDET_DATA="data.shapes_train=8 data.shapes_val=2 data.shapes_image_size=64 data.min_size=64 data.max_size=64
  data.workers=0"
  MEGDET_RUN="solver.max_iter=2 solver.steps=[1] solver.warmup_iters=0"
else
  BN_IMAGE=800x1088 BN_ITERS=10 BN_LAYERS=0 AR_ITERS=200 PEER_ITERS=30
  SHAPES_DATA=""
  SHAPES_RUN="solver.max_iter=60 solver.steps=[40,50] solver.warmup_iters=10 train.log_period=10 train.checkpoint_period=30"
  SHAPES_MORE="solver.max_iter=80"
  MEGDET_DATA="data.shapes_train=64 data.shapes_val=4 data.shapes_image_size=800 data.min_size=800 data.max_size=1333
  data.workers=2"
  MEGDET_RUN="solver.max_iter=30 solver.steps=[20,25] solver.warmup_iters=5"
fi
# shapes_tiny as given, except the schedule (literal iterations at np=1) and the data size
SHAPES="solver.scale_schedule=false $SHAPES_DATA"
# megdet_r50_fpn (ResNet-50-FPN, 2 images/GPU, 800 px, SyncBN) on the generated shapes set: there is no
# COCO and no network there, so random backbone weights (model.backbone_weights is empty in the config)
MEGDET="data.dataset=shapes data.root=$WORK/shapes-megdet data.train_images=train
data.train_annotations=annotations/instances_train.json data.val_images=val
data.val_annotations=annotations/instances_val.json $MEGDET_DATA solver.scale_schedule=false $MEGDET_RUN
train.log_period=1 train.checkpoint_period=100000 train.checkpoint_minutes=0"
# train.device=cuda|cpu (what this run has) is added by benchmark_gpu_step.py

train_run() {  # train_run NAME OUTDIR ARGS... : scripts/train.py at np=1, then its figures
  local name=$1 dir=$2
  shift 2
  "$PY" scripts/train.py --output-dir "$dir" "$@" && "$PY" "$STEP" run-figures --out "$FIG/$name.json" --output-dir "$dir"
}
export -f train_run
export PY STEP FIG

# --- 1. install --------------------------------------------------------------------------------
if [ "$MODE" = rehearse ]; then
  # the build itself takes minutes: rehearse the GPU machine's setup.sh checks (NCCL flavour where
  # this machine has a CUDA toolkit), not its build
  gpu=0
  { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || command -v nvcc >/dev/null; } && gpu=1
  step install 180 env HVD_MEGDET_GPU=$gpu HVD_MEGDET_MPI=0 HVD_MEGDET_VENV="$("$PY" -c 'import sys; print(sys.prefix)')" \
    bash scripts/setup.sh --check-only
else
  # Into the machine's own Python (it is discarded afterwards); a venv seeing its packages where
  # that is not writable. CUDA kernels for this GPU only (all of nvcc's would take minutes more).
  VENV=$("$PY" -c 'import sys; print(sys.prefix)')
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ ! -w "$SITE" ] || [ ! -x "$VENV/bin/python" ]; then
    VENV=$WORK/venv
    "$PY" -m venv "$VENV" && echo "$SITE" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_check_base.pth"
  fi
  CC_LIST=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 90)
  step install 420 env HVD_MEGDET_OFFLINE="$CARRY" HVD_MEGDET_GPU=1 HVD_MEGDET_MPI=0 HVD_MEGDET_VENV="$VENV" \
    HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-$CC_LIST}" bash scripts/setup.sh
  PY=$VENV/bin/python
fi
[ -f "$LOGS/install.log" ] && "$RECPY" "$STEP" setup-figures --json "$JSON" --log "$LOGS/install.log"

# --- 2-4. facts, SyncBN, allreduce latency ------------------------------------------------------
step facts 120 "$PY" "$STEP" facts --out "$FIG/facts.json"
step syncbn 180 "$PY" "$STEP" syncbn --out "$FIG/syncbn.json" --image "$BN_IMAGE" --iters "$BN_ITERS" \
  --layers "$BN_LAYERS"
step allreduce_latency 90 "$PY" "$STEP" allreduce --out "$FIG/allreduce_latency.json" --iters "$AR_ITERS"

# --- 5-9. shapes_tiny on the device: default, AMP, AMP + clipping; resume; eval-only ------------
ST=$WORK/shapes_tiny
# shellcheck disable=SC2086
step shapes_tiny 150 bash -c 'train_run "$@"' _ shapes_tiny "$ST" $SHAPES $SHAPES_RUN
step shapes_tiny_amp 150 bash -c 'train_run "$@"' _ shapes_tiny_amp "$ST-amp" $SHAPES $SHAPES_RUN solver.amp=true
step shapes_tiny_amp_clip 150 bash -c 'train_run "$@"' _ shapes_tiny_amp_clip "$ST-amp-clip" $SHAPES $SHAPES_RUN \
  solver.amp=true solver.clip_grad_norm=10
step shapes_tiny_resume 150 bash -c 'train_run "$@"' _ shapes_tiny_resume "$ST" --resume $SHAPES $SHAPES_RUN $SHAPES_MORE
step shapes_tiny_eval_only 120 bash -c 'train_run "$@"' _ shapes_tiny_eval_only "$ST" --eval-only $SHAPES $SHAPES_RUN \
  $SHAPES_MORE

# --- 10-15. megdet_r50_fpn at 800 px: SyncBN vs BN, AMP off/on; torchvision's own model -----------
for norm in syncbn bn; do
  for amp in fp32 amp; do
    step "megdet_${norm}_$amp" 180 "$PY" "$STEP" train --out "$FIG/megdet_${norm}_$amp.json" \
      --output-dir "$WORK/megdet_${norm}_$amp" --config megdet_r50_fpn $MEGDET model.norm=$norm \
      solver.amp=$([ $amp = amp ] && echo true || echo false)
  done
done
for amp in fp32 amp; do
  step "torchvision_peer_$amp" 150 "$PY" "$STEP" peer --out "$FIG/torchvision_peer_$amp.json" \
    --output-dir "$WORK/peer" --iters "$PEER_ITERS" $([ $amp = amp ] && echo --amp) --config megdet_r50_fpn $MEGDET
done

# --- logs back (checkpoints stay behind) -------------------------------------------------------
tar -czf "$OUT_DIR/gpu_logs.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='*.jpg' --exclude='tensorboard' --exclude='*.png' \
  --exclude='shapes-*' --exclude='venv' --exclude='detections.json' logs figures $(cd "$WORK" && ls -d cache/*.log \
  shapes_tiny* megdet_* 2>/dev/null) 2>/dev/null || true
"$RECPY" "$STEP" meta --json "$JSON" --set "{\"total_s\": $(( $(date +%s) - T0 )), \"finished\": \"$(date -u +%FT%TZ)\"}"
echo "[gpu_check] done in $(( $(date +%s) - T0 ))s: $JSON"
[ -n "${GPU_CHECK_WORK:-}" ] || [ "$MODE" != rehearse ] || rm -rf "$WORK"
exit $FAILED
