#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on localhost, entirely inside one private folder
# (Debian's slurmctld, slurmd, slurm-client, munge; libpmix-dev for srun --mpi=pmix).
#
#   scripts/local_slurm.sh start DIR [NODES_CONF]   start; prints the SLURM_CONF to export
#   scripts/local_slurm.sh stop DIR                 cancel jobs, stop every daemon it started
#   scripts/local_slurm.sh conf DIR NODES_CONF      only write DIR/slurm.conf (for sbatch --test-only)
#
# NODES_CONF: NodeName/PartitionName lines to use instead of this machine's `slurmd -C`.
set -euo pipefail

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { sed -n '2,10p' "$0"; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export SLURM_CONF="$DIR/slurm.conf"
# private ports, derived from the folder so that two clusters on one machine do not collide
PORT=$(( 20000 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 20000 ))

write_conf() {
  local nodes
  if [ -n "${1:-}" ]; then nodes=$(cat "$1")
  else
    nodes="$(slurmd -C | head -n1 | sed 's/ *$//') NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  fi
  mkdir -p "$DIR"/{munge,spool/ctld,spool/d,log,run}
  cat > "$SLURM_CONF" <<EOF
ClusterName=hvdlocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
GresTypes=gpu
$nodes
EOF
}

start() {
  for b in slurmctld slurmd munged sinfo sbatch; do
    command -v "$b" >/dev/null || { echo "local_slurm: '$b' not found: apt-get install slurmctld slurmd slurm-client munge libpmix-dev (or scripts/setup.sh --slurm)" >&2; exit 1; }
  done
  write_conf "${1:-}"
  chmod 755 "$DIR/munge"   # munge clients need to reach the socket
  [ -f "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
         --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  setsid slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/slurmctld.pid.started"
  setsid slurmd -D -f "$SLURM_CONF" >>"$DIR/log/slurmd.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/slurmd.pid.started"
  for _ in $(seq 1 150); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  echo "local_slurm: the node did not become idle in 30 s; logs in $DIR/log:" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop; exit 1
}

stop() {
  if [ -f "$DIR/run/slurmctld.pid.started" ]; then
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for f in slurmd.pid.started slurmctld.pid.started munged.pid; do
    [ -f "$DIR/run/$f" ] || continue
    pid=$(cat "$DIR/run/$f"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$DIR/run/$f"
  done
}

case "$cmd" in
  start) start "${3:-}" ;;
  stop) stop ;;
  conf) write_conf "${3:?NODES_CONF}"; echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "local_slurm: unknown command '$cmd'" >&2; exit 2 ;;
esac
