#!/bin/bash
# The paper's baseline from the same template: 1 node x 8 GPUs, 2 images each = batch 16,
# lr 0.02, 90k iterations; BN groups of all 8 ranks (16 images).
#   bash slurm/baseline_8gpu.sh [more sbatch options]
HERE=$(cd "$(dirname "$0")" && pwd)
export CONFIG=${CONFIG:-megdet_r50_fpn}
export EXTRA="model.bn_group_size=8 ${EXTRA:-}"
exec sbatch --job-name=megdet-8gpu --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 "$@" "$HERE/megdet.sbatch"
