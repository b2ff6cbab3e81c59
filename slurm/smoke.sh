#!/bin/bash
# CPU smoke test from the same template: 1 node, 2 tasks, no GPU, shapes_tiny for a few iterations.
#   bash slurm/smoke.sh [more sbatch options]      (EXTRA=... to change the overrides)
HERE=$(cd "$(dirname "$0")" && pwd)
export CONFIG=${CONFIG:-shapes_tiny}
export EXTRA=${EXTRA:-"solver.max_iter=20 solver.steps=[15] solver.warmup_iters=5 train.log_period=5 train.checkpoint_period=10 train.eval_images=16"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec sbatch --job-name=megdet-smoke --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
  --time=00:20:00 --signal=USR1@60 "$@" "$HERE/megdet.sbatch"
