#!/usr/bin/env bash
# The test command: set up everything (idempotent; the first run builds Horovod, ~6 min)
# and run the whole suite, multi-process Horovod jobs (Gloo and MPI) and the SLURM tests included.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh" --slurm
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest "$@"
