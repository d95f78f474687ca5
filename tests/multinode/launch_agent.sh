#!/usr/bin/env bash
# Open MPI's launch agent for the emulated cluster (cluster.sh):
#   mpirun --mca plm_rsh_agent tests/multinode/launch_agent.sh ...
# mpirun calls it as ssh would be called, `AGENT [-options] HOST COMMAND...`,
# with HOST a node's address from the hostfile and COMMAND a shell command
# line (Open MPI quotes it for a remote shell). The agent finds the moesim-*
# network namespace holding HOST's address and runs COMMAND there through
# /bin/sh, in a UTS namespace of its own whose host name is the namespace's
# name: like a real node, each emulated node then has its own host name, so
# Open MPI's per-node files (the session directory, vader's shared-memory
# segments in /dev/shm, both named after the host) do not collide across
# nodes that share one filesystem.
set -euo pipefail

while [ $# -gt 0 ] && [[ $1 == -* ]]; do shift; done
[ $# -ge 2 ] || {
  echo "launch_agent: usage: launch_agent.sh [-options] HOST COMMAND..." >&2
  exit 255
}
host=$1
shift

node=
for ns in $(ip netns list | awk 'index($1, "moesim-") == 1 { print $1 }'); do
  if ip -n "$ns" -4 -o addr show | awk '{ sub(/\/.*/, "", $4); print $4 }' | grep -qxF "$host"; then
    node=$ns
    break
  fi
done
[ -n "$node" ] || {
  echo "launch_agent: no moesim-* network namespace holds address $host (is the cluster up? tests/multinode/cluster.sh status)" >&2
  exit 255
}

exec ip netns exec "$node" unshare --uts /bin/sh -c "hostname $node && $*"
