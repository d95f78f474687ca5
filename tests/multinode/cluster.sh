#!/usr/bin/env bash
# An emulated cluster on one machine: N "nodes", each a Linux network
# namespace, joined by veth pairs through a bridge in the root namespace.
#
#   cluster.sh up       (re)creates the cluster; removes any leftover of an
#                       earlier run of the same cluster id first
#   cluster.sh down     kills every process inside the nodes, deletes the
#                       namespaces, the bridge, the state directory and
#                       Open MPI's files named after the nodes
#   cluster.sh status   nodes, addresses, link shaping, processes; exit 1 if
#                       the cluster is not (entirely) up
#
# Knobs (environment):
#   MOESIM_CLUSTER_NODES  number of nodes, 2..99 (default 2)
#   MOESIM_CLUSTER_SLOTS  MPI slots per node in the hostfile (default 2)
#   MOESIM_CLUSTER_RATE   rate of every node link, a tc rate (default 1gbit)
#   MOESIM_CLUSTER_ID     1-4 characters [a-z0-9] naming this cluster, so two
#                         clusters can coexist (default mn)
#   MOESIM_CLUSTER_NET    the first three octets of the cluster's /24
#                         (default 10.213.14)
#   MOESIM_CLUSTER_DIR    state directory (default /tmp/moesim-cluster-ID)
#
# Names: namespace moesim-ID-nodeI (also the node's host name, see
# launch_agent.sh), bridge moesim-ID-br holding NET.254, veth moesim-ID-vI
# (bridge side) and moesim-ID-pI (inside node I, address NET.(I+1)).
# `up` writes DIR/hostfile: one line per node, "NET.(I+1) slots=SLOTS".
#
# Every link is shaped in both directions by a tbf qdisc (node egress on
# moesim-ID-pI, bridge egress towards the node on moesim-ID-vI), so traffic
# between two nodes crosses two shaped queues at RATE. Only bandwidth is
# emulated: latency cannot be, because this kernel has no netem qdisc
# (`tc qdisc add ... netem` fails); latency belongs to the projection model.
# Needs root and iproute2 (`make deps` installs it).
set -euo pipefail

nodes=${MOESIM_CLUSTER_NODES:-2}
slots=${MOESIM_CLUSTER_SLOTS:-2}
rate=${MOESIM_CLUSTER_RATE:-1gbit}
id=${MOESIM_CLUSTER_ID:-mn}
net=${MOESIM_CLUSTER_NET:-10.213.14}
dir=${MOESIM_CLUSTER_DIR:-/tmp/moesim-cluster-$id}

prefix=moesim-$id
bridge=$prefix-br

die() {
  echo "cluster: $*" >&2
  exit 1
}

[[ $id =~ ^[a-z0-9]{1,4}$ ]] ||
  die "MOESIM_CLUSTER_ID '$id' must be 1-4 characters [a-z0-9] (interface names hold 15)"
[[ $nodes =~ ^[0-9]{1,2}$ && $nodes -ge 2 ]] ||
  die "MOESIM_CLUSTER_NODES '$nodes' must be a number from 2 to 99"
[[ $slots =~ ^[0-9]+$ && $slots -ge 1 ]] ||
  die "MOESIM_CLUSTER_SLOTS '$slots' must be a positive number"
[[ $net =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
  die "MOESIM_CLUSTER_NET '$net' must be three octets, e.g. 10.213.14"
[ "$(id -u)" -eq 0 ] || die "run as root: namespaces, veth and tc need CAP_NET_ADMIN"
command -v ip >/dev/null || die "ip missing: install iproute2 (make deps)"
command -v tc >/dev/null ||
  die "tc missing: install iproute2 (make deps)"

# The namespaces of this cluster id that exist now, whatever their number.
cluster_namespaces() {
  ip netns list | awk -v p="$prefix-node" 'index($1, p) == 1 { print $1 }'
}

# Links of this cluster id left in the root namespace (bridge, veth ends).
cluster_links() {
  ip -o link show | awk -F': ' -v p="$prefix-" '{ sub(/@.*/, "", $2) } index($2, p) == 1 { print $2 }'
}

# Kills every process inside namespace $1 (the ranks and daemons of a job
# that outlived its mpirun) and waits up to 5 s for them to be gone.
kill_namespace_processes() {
  local ns=$1 pids deadline
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while [ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ]; do
    [ "$SECONDS" -ge "$deadline" ] && die "processes $(ip netns pids "$ns" | tr '\n' ' ')still in $ns 5 s after SIGKILL"
    sleep 0.1
  done
}

cluster_down() {
  local ns link
  for ns in $(cluster_namespaces); do
    kill_namespace_processes "$ns"
    ip netns delete "$ns"
  done
  # Deleting a namespace deletes its veth ends and so their peers; only the
  # bridge (or a veth whose namespace was never made) remains.
  for link in $(cluster_links); do
    ip link delete "$link" 2>/dev/null || true
  done
  # What Open MPI leaves of a job killed hard, named after our nodes' host
  # names (launch_agent.sh): its session directory and vader's segments.
  rm -rf "$dir" /tmp/ompi."$prefix"-node* /dev/shm/vader_segment."$prefix"-node*
  [ -z "$(cluster_namespaces)" ] || die "namespaces left after down: $(cluster_namespaces | tr '\n' ' ')"
  [ -z "$(cluster_links)" ] || die "links left after down: $(cluster_links | tr '\n' ' ')"
}

# tbf needs a bucket of at least one packet (a 64 KiB GSO segment is split
# to fit); 256 KiB is 2 ms at 1gbit, enough for the kernel's timer to keep the
# rate, and it bounds the burst a slow link lets through unshaped.
shape() {
  tc "$@" root tbf rate "$rate" burst 256kb latency 50ms
}

cluster_up() {
  local i ns veth peer hostfile
  cluster_down
  mkdir -p "$dir"
  hostfile=$dir/hostfile
  : >"$hostfile"

  ip link add "$bridge" type bridge
  ip addr add "$net.254/24" dev "$bridge"
  ip link set "$bridge" up

  for ((i = 0; i < nodes; i++)); do
    ns=$prefix-node$i
    veth=$prefix-v$i
    peer=$prefix-p$i
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$peer" netns "$ns"
    ip link set "$veth" master "$bridge" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$net.$((i + 1))/24" dev "$peer"
    ip -n "$ns" link set "$peer" up
    shape qdisc add dev "$veth"
    shape -n "$ns" qdisc add dev "$peer"
    echo "$net.$((i + 1)) slots=$slots" >>"$hostfile"
  done
  echo "cluster: up: $nodes nodes x $slots slots, links $rate, subnet $net.0/24, hostfile $hostfile"
}

cluster_status() {
  local ns namespaces ok=1 found=0
  namespaces=$(cluster_namespaces)
  ip link show "$bridge" >/dev/null 2>&1 || {
    echo "bridge $bridge: missing"
    ok=0
  }
  for ns in $namespaces; do
    found=$((found + 1))
    echo "$ns: $(ip -n "$ns" -4 -o addr show scope global | awk '{ print $2, $4 }')"
    echo "  qdisc: $(tc -n "$ns" qdisc show | grep tbf || echo none)"
    echo "  processes: $(ip netns pids "$ns" | tr '\n' ' ')"
  done
  [ -f "$dir/hostfile" ] && echo "hostfile $dir/hostfile: $(tr '\n' ';' <"$dir/hostfile")"
  [ "$found" -eq "$nodes" ] || {
    echo "nodes: $found of $nodes"
    ok=0
  }
  [ "$ok" -eq 1 ]
}

case ${1:-} in
  up) cluster_up ;;
  down) cluster_down ;;
  status) cluster_status ;;
  *) die "usage: cluster.sh up|down|status (knobs: MOESIM_CLUSTER_NODES, _SLOTS, _RATE, _ID, _NET, _DIR)" ;;
esac
