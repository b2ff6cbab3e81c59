#!/usr/bin/env bash
# A throwaway SLURM cluster on localhost, entirely inside one private folder
# (Debian's slurmctld, slurmd, slurm-client, munge; libpmix-dev for srun --mpi=pmix).
#
#   scripts/local_slurm.sh start DIR                 this machine as one node (from `slurmd -C`)
#   scripts/local_slurm.sh start-fake DIR N GPUS CPUS
#                                                    N pretend nodes gpu01..gpuN with GPUS GPUs and
#                                                    CPUS CPUs each (one slurmd per node, resources
#                                                    taken from the config): for sbatch --test-only,
#                                                    and (GPUS=0) for jobs that must move between nodes
#   scripts/local_slurm.sh start-nodes DIR CLUSTER   real hosts: one slurmd on each node of a running
#                                                    scripts/local_cluster.sh CLUSTER (its own address),
#                                                    slurmctld on the cluster's "head"; clients run there
#                                                    or on a node (local_cluster.sh exec CLUSTER head sbatch ...)
#   scripts/local_slurm.sh stop DIR                  cancel jobs, stop every daemon it started
#
# start prints the line to eval: export SLURM_CONF=DIR/slurm.conf
set -euo pipefail

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { sed -n '2,16p' "$0"; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export SLURM_CONF="$DIR/slurm.conf"
# private ports, derived from the folder, so that two clusters on one machine do not collide
PORT=$(( 20000 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 20000 ))

write_conf() {  # write_conf NODE_LINES [EXTRA_LINES] [CONTROLLER(ADDRESS)]
  mkdir -p "$DIR"/{munge,spool/ctld,log,run}
  cat > "$SLURM_CONF" <<EOF
ClusterName=hvdlocal
SlurmctldHost=${3:-$(hostname -s)(127.0.0.1)}
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
# cred_expire also delays a requeued job (default 120 s); short here so that tests are quick
CredType=cred/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
# a requeued job becomes eligible after cred_expire; the main loop then starts it (default every 60 s)
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=${SLURMD_TIMEOUT:-30}
InactiveLimit=0
KillWait=${KILL_WAIT:-5}
MinJobAge=600
GresTypes=gpu
${2:-}
$1
EOF
}

need() {
  for b in slurmctld slurmd munged sinfo sbatch scontrol; do
    command -v "$b" >/dev/null || { echo "local_slurm: '$b' not found: apt-get install slurmctld slurmd slurm-client munge libpmix-dev (or scripts/setup.sh --slurm)" >&2; exit 1; }
  done
}

ON_HEAD="" ON_NODE=""  # start-nodes: commands to run on the cluster's head / a node (prefix + name)
daemons() {  # daemons NODE_NAME... : munge, slurmctld, one slurmd per name; wait until all idle
  chmod 755 "$DIR/munge"   # munge clients must reach the socket (a path: every namespace reaches it)
  [ -f "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
         --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  setsid $ON_HEAD slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/slurmctld.started"
  for n in "$@"; do
    setsid ${ON_NODE:+$ON_NODE $n} slurmd -D -N "$n" -f "$SLURM_CONF" >>"$DIR/log/slurmd-$n.out" 2>&1 < /dev/null &
    echo $! > "$DIR/run/slurmd-$n.started"
  done
  for _ in $(seq 1 150); do
    if [ "$($ON_HEAD sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -eq $# ]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  echo "local_slurm: nodes not idle after 30 s; logs in $DIR/log:" >&2
  $ON_HEAD sinfo -R >&2 2>/dev/null || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop; exit 1
}

start() {
  need
  local name
  name=$(hostname -s)
  write_conf "$(slurmd -C | head -n1 | sed 's/ *$//') NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  daemons "$name"
}

start_fake() {  # N GPUS CPUS
  need
  local n=$1 gpus=$2 cpus=$3 lines="" names=() gres=""
  [ "$gpus" -gt 0 ] && gres="Gres=gpu:$gpus"
  mkdir -p "$DIR/dev"
  for g in $(seq 0 $((gpus - 1))); do : > "$DIR/dev/nvidia$g"; done   # device files for gres.conf
  for i in $(seq 1 "$n"); do
    names+=("$(printf 'gpu%02d' "$i")")
    lines+="NodeName=${names[-1]} NodeAddr=127.0.0.1 Port=$((PORT + 10 + i)) CPUs=$cpus${gres:+ $gres} RealMemory=1000 State=UNKNOWN"$'\n'
  done
  lines+="PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  # slurmd reports this machine's hardware; take the node's resources from the config instead
  write_conf "$lines" "SlurmdParameters=config_overrides"
  if [ "$gpus" -gt 0 ]; then
    echo "NodeName=gpu[01-$(printf '%02d' "$n")] Name=gpu File=$DIR/dev/nvidia[0-$((gpus - 1))]" > "$DIR/gres.conf"
  fi
  daemons "${names[@]}"
}

start_nodes() {  # CLUSTER: a running scripts/local_cluster.sh
  need
  local cdir lines="" names=() net i n
  cdir=$(cd "$1" && pwd)
  n=$(cat "$cdir/nodes" 2>/dev/null) || { echo "local_slurm: no running local_cluster in $cdir" >&2; exit 2; }
  net=$(bash "$(dirname "$0")/local_cluster.sh" net "$cdir")
  echo "$cdir" > "$DIR/cluster"
  ON_HEAD="bash $(dirname "$0")/local_cluster.sh exec $cdir head"
  ON_NODE="bash $(dirname "$0")/local_cluster.sh exec $cdir"
  for i in $(seq 1 "$n"); do
    names+=("$(printf 'node%02d' "$i")")
    lines+="NodeName=${names[-1]} NodeHostname=${names[-1]} NodeAddr=$net.$i CPUs=2 RealMemory=1000 State=UNKNOWN"$'\n'
  done
  lines+="PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  # a node lost is declared DOWN (and its job requeued) after SlurmdTimeout: 10 s, not 30, for the tests
  # KillWait as SLURM's default (30 s): the time a job script has after TERM (a node failure's cancel)
  KILL_WAIT=30 SLURMD_TIMEOUT=10 write_conf "$lines" "SlurmdParameters=config_overrides" "head($net.254)"
  daemons "${names[@]}"
}

stop() {
  local head=""
  [ -f "$DIR/cluster" ] && head="bash $(dirname "$0")/local_cluster.sh exec $(cat "$DIR/cluster") head"
  if [ -f "$DIR/run/slurmctld.started" ]; then
    $head scancel --full --quiet $($head squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$($head squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for f in "$DIR"/run/slurmd-*.started "$DIR/run/slurmctld.started" "$DIR/run/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

case "$cmd" in
  start) start ;;
  start-fake) start_fake "${3:?N}" "${4:?GPUS}" "${5:?CPUS}" ;;
  start-nodes) start_nodes "${3:?CLUSTER}" ;;
  stop) stop ;;
  *) echo "local_slurm: unknown command '$cmd'" >&2; exit 2 ;;
esac
