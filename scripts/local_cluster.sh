#!/usr/bin/env bash
# Real hosts on this machine (root; Linux namespaces): nodes node01..nodeN, each with its own
# hostname (UTS), network namespace (one interface on a private bridge, an address that exists only
# inside these namespaces), /etc/hosts listing the nodes (bind-mounted in its own mount namespace),
# an sshd of its own (root login with a key generated here) and node-local scratch (/tmp and the
# cache folder as private tmpfs), while the repository and every other folder stay shared, like a
# cluster's shared filesystem. The machine's own interfaces, routes, /etc/hosts and sshd are
# never touched: the bridge lives in a namespace of its own too.
#
#   scripts/local_cluster.sh start DIR N        start N nodes (state, keys and logs in DIR)
#   scripts/local_cluster.sh stop DIR           end everything start made (by the PIDs it recorded)
#   scripts/local_cluster.sh status DIR         nodes, addresses, daemons
#   scripts/local_cluster.sh exec DIR NODE CMD  run CMD on NODE (its hostname, network, mounts); NODE
#                                               "head": the switch's own address (.254), where a
#                                               controller (slurmctld) can live: scripts/local_slurm.sh
#                                               start-nodes
#   scripts/local_cluster.sh kill DIR NODE      power loss: every process of NODE killed (SIGKILL)
#   scripts/local_cluster.sh link DIR NODE up|down   a network partition of NODE (its link set down)
#
# Jobs run from a node, e.g.
#   scripts/local_cluster.sh exec DIR node01 horovodrun -np 4 -H node01:2,node02:2 python scripts/train.py
# Shared folders under /tmp (a checkout in /tmp, say) stay shared: the repository and the folders in
# LOCAL_CLUSTER_SHARE (colon-separated) are bound back into each node's private /tmp.
# Needs: iproute2, util-linux (unshare, nsenter), openssh-server (scripts/setup.sh --slurm).
set -euo pipefail

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { sed -n '2,18p' "$0"; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SUM=$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)
TAG=$(printf '%04x' $(( SUM % 65536 )))           # namespace names: hvd<TAG>n<i>, hvd<TAG>sw
NET=10.$(( 100 + SUM % 100 )).$(( (SUM / 100) % 250 ))  # the nodes' /24, inside the namespaces only
CACHE=${HVD_MEGDET_CACHE:-$HOME/.cache/hvd_megdet}  # node-local on every node
SW=hvd${TAG}sw
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARE="$REPO${LOCAL_CLUSTER_SHARE:+:$LOCAL_CLUSTER_SHARE}"
case "$DIR/" in
  /tmp/*|"$CACHE"/*) echo "local_cluster: $DIR would be hidden on the nodes (/tmp and $CACHE are node-local there): use a shared folder, e.g. /var/tmp/cluster" >&2; exit 2 ;;
esac

ns() { printf 'hvd%sn%02d' "$TAG" "$1"; }
node() { printf 'node%02d' "$1"; }
holder() { cat "$DIR/$(node "$1")/holder.pid"; }
count() { cat "$DIR/nodes" 2>/dev/null || echo 0; }
index() {  # node name -> i
  local n=${1#node}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$((10#$n))" -ge 1 ] && [ "$((10#$n))" -le "$(count)" ] \
    || { echo "local_cluster: no node '$1' in $DIR (nodes: node01..$(node "$(count)"))" >&2; exit 2; }
  echo $((10#$n))
}

need() {
  for b in ip unshare nsenter ssh ssh-keygen /usr/sbin/sshd; do
    command -v "$b" >/dev/null || { echo "local_cluster: '$b' not found: apt-get install iproute2 util-linux openssh-server openssh-client (or scripts/setup.sh --cluster)" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "local_cluster: needs root (namespaces, mounts)" >&2; exit 1; }
}

start() {
  local n=$1 i
  need
  [ "$n" -ge 1 ] && [ "$n" -le 250 ] || { echo "local_cluster: 1-250 nodes" >&2; exit 2; }
  [ ! -f "$DIR/nodes" ] || { echo "local_cluster: $DIR holds a running cluster (stop it first)" >&2; exit 2; }
  mkdir -p "$DIR/ssh/client" "$DIR/log"
  # one key pair for root logins and one host key, for this cluster only
  [ -f "$DIR/ssh/client/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "local_cluster $DIR" -f "$DIR/ssh/client/id_ed25519"
  [ -f "$DIR/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/host_ed25519"
  cp "$DIR/ssh/client/id_ed25519.pub" "$DIR/ssh/authorized_keys"
  cat > "$DIR/ssh/client/config" <<EOF
Host node*
  IdentityFile $DIR/ssh/client/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 10
EOF
  chmod 700 "$DIR/ssh/client"; chmod 600 "$DIR/ssh/client/config" "$DIR/ssh/client/id_ed25519"
  { echo "127.0.0.1 localhost"; echo "$NET.254 head"; for i in $(seq 1 "$n"); do echo "$NET.$i $(node "$i")"; done; } \
    > "$DIR/hosts"
  echo "$n" > "$DIR/nodes"
  # the switch: a bridge in a namespace of its own
  ip netns add "$SW"
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  ip -n "$SW" addr add "$NET.254/24" dev br0   # "head": reachable from every node
  ip -n "$SW" link set lo up
  mkdir -p /run/sshd /root/.ssh  # sshd's privilege-separation dir; the mount point of the nodes' ssh config
  for i in $(seq 1 "$n"); do
    local name dir
    name=$(node "$i") dir=$DIR/$(node "$i")
    mkdir -p "$dir"
    ip netns add "$(ns "$i")"
    ip -n "$SW" link add "v$i" type veth peer name eth0 netns "$(ns "$i")"
    ip -n "$SW" link set "v$i" master br0 up
    ip -n "$(ns "$i")" addr add "$NET.$i/24" dev eth0
    ip -n "$(ns "$i")" link set eth0 up
    ip -n "$(ns "$i")" link set lo up
    cat > "$dir/sshd_config" <<EOF
ListenAddress $NET.$i
Port 22
HostKey $DIR/ssh/host_ed25519
PidFile $dir/sshd.pid
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
PrintMotd no
AcceptEnv *
EOF
    # the node's holder: its UTS + mount namespaces (inside its network namespace) live as long as it
    mkdir -p "$dir/machine-tmp"
    cat > "$dir/init.sh" <<EOF
set -e
hostname $name
mount --bind $DIR/hosts /etc/hosts
mount --bind $DIR/ssh/client /root/.ssh
mount --bind /tmp $dir/machine-tmp       # the machine's /tmp, seen only in this node's mounts
mount -t tmpfs -o size=4g,mode=1777 tmpfs /tmp
IFS=: read -ra share <<< "$SHARE"
for p in "\${share[@]}"; do
  case "\$p" in /tmp/?*) mkdir -p "\$p"; mount --bind "$dir/machine-tmp/\${p#/tmp/}" "\$p" ;; esac
done
mkdir -p "$CACHE" && mount -t tmpfs -o size=8g tmpfs "$CACHE"
/usr/sbin/sshd -f $dir/sshd_config -E $DIR/log/sshd-$name.log
echo ready > $dir/ready
exec sleep infinity
EOF
    rm -f "$dir/ready"
    # nsenter, not `ip netns exec`: that remounts /sys, which loses the machine's cgroup mounts (slurmd)
    setsid nsenter --net="/run/netns/$(ns "$i")" unshare --uts --mount --propagation private bash "$dir/init.sh" \
      >>"$DIR/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$dir/holder.pid"
  done
  for i in $(seq 1 "$n"); do
    for _ in $(seq 1 100); do [ -f "$DIR/$(node "$i")/ready" ] && break; sleep 0.1; done
    [ -f "$DIR/$(node "$i")/ready" ] || { echo "local_cluster: $(node "$i") did not start:" >&2; cat "$DIR/log/$(node "$i").out" >&2; stop; exit 1; }
  done
  # every node reaches every other by name over ssh
  for i in $(seq 1 "$n"); do
    on "$i" ssh "$(node $(( i % n + 1 )))" true || { echo "local_cluster: ssh from $(node "$i") failed" >&2; stop; exit 1; }
  done
  echo "local_cluster: $n nodes up in $DIR ($NET.1-$n): scripts/local_cluster.sh exec $DIR node01 CMD"
}

on() {  # on I CMD... : run CMD in node I's namespaces, in the current folder
  local i=$1; shift
  nsenter --target "$(holder "$i")" --uts --mount --net --wd="$PWD" -- "$@"
}

stop() {
  local n i pid
  n=$(count)
  for i in $(seq 1 "$n"); do
    kill_node "$i" 2>/dev/null || true
  done
  for i in $(seq 1 "$n"); do ip netns del "$(ns "$i")" 2>/dev/null || true; done
  ip netns del "$SW" 2>/dev/null || true
  rm -f "$DIR/nodes" "$DIR"/node*/holder.pid "$DIR"/node*/ready "$DIR"/node*/sshd.pid
}

kill_node() {  # every process in node I's network namespace (its sshd, its job's ranks), then its holder
  local i=$1 pids
  pids=$(ip netns pids "$(ns "$i")" 2>/dev/null || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  [ -f "$DIR/$(node "$i")/holder.pid" ] && kill -9 "$(holder "$i")" 2>/dev/null || true
  for _ in $(seq 1 50); do [ -z "$(ip netns pids "$(ns "$i")" 2>/dev/null)" ] && return 0; sleep 0.1; done
}

status() {
  local n i
  n=$(count)
  [ "$n" -gt 0 ] || { echo "no cluster in $DIR"; return 1; }
  for i in $(seq 1 "$n"); do
    local state=down procs
    kill -0 "$(holder "$i")" 2>/dev/null && state=up
    procs=$(ip netns pids "$(ns "$i")" 2>/dev/null | wc -l)
    echo "$(node "$i") $NET.$i $state link=$(ip -n "$SW" -br link show "v$i" 2>/dev/null | awk '{print $2}') processes=$procs"
  done
}

case "$cmd" in
  start) start "${3:?N}" ;;
  stop) stop ;;
  status) status ;;
  net) echo "$NET" ;;
  exec)
    if [ "${3:?NODE}" = head ]; then
      shift 3; exec nsenter --net="/run/netns/$SW" unshare --uts bash -c 'hostname head && exec "$@"' head "$@"
    fi
    i=$(index "$3"); shift 3; on "$i" "$@" ;;
  kill) i=$(index "${3:?NODE}"); kill_node "$i"; ip -n "$SW" link set "v$i" down 2>/dev/null || true ;;
  link) i=$(index "${3:?NODE}"); ip -n "$SW" link set "v$i" "${4:?up|down}" ;;
  *) echo "local_cluster: unknown command '$cmd'" >&2; exit 2 ;;
esac
