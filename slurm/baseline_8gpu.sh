#!/bin/bash
# The paper's baseline from the same template: 1 node x 8 GPUs, 2 images each = batch 16,
# lr 0.02, 90k iterations. The config's BN size (32 images) needs 16 ranks: on 8, BN statistics
# span the whole world (16 images), which the job logs and --plan prints.
#   bash slurm/baseline_8gpu.sh [more sbatch options]
HERE=$(cd "$(dirname "$0")" && pwd)
export CONFIG=${CONFIG:-megdet_r50_fpn}
export EXTRA=${EXTRA:-}
exec sbatch --job-name=megdet-8gpu --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 "$@" "$HERE/megdet.sbatch"
