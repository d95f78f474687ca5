#!/usr/bin/env bash
# mpirun across the emulated cluster that cluster.sh brought up (same
# MOESIM_CLUSTER_* knobs): cluster_mpirun.sh [mpirun options] PROGRAM ARGS...
# Every rank's placement and transport is set here, for the test and the
# benchmark alike: the hostfile of the nodes, launch_agent.sh to start each
# node's daemon in its namespace, TCP only on the cluster's subnet, vader
# within a node. mpi_yield_when_idle: each node's slots look free to Open
# MPI, but all ranks share this machine's cores, and busy-polling ranks made
# a 30-step run 10x slower (8.9 s vs 0.9 s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
id=${MOESIM_CLUSTER_ID:-mn}
net=${MOESIM_CLUSTER_NET:-10.213.14}
dir=${MOESIM_CLUSTER_DIR:-/tmp/moesim-cluster-$id}
[ -f "$dir/hostfile" ] || {
  echo "cluster_mpirun: $dir/hostfile missing: bring the cluster up first (tests/multinode/cluster.sh up)" >&2
  exit 1
}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# An enclosing mpirun's variables would turn this job into its child.
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(OMPI_COMM|OMPI_MCA|PMIX_)' || true)
exec mpirun --hostfile "$dir/hostfile" --oversubscribe --bind-to none \
  -x OPENBLAS_NUM_THREADS -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
  --mca plm_rsh_agent "$here/launch_agent.sh" --mca plm_rsh_no_tree_spawn 1 \
  --mca oob_tcp_if_include "$net.0/24" \
  --mca btl_tcp_if_include "$net.0/24" --mca btl "self,vader,tcp" \
  --mca mpi_yield_when_idle 1 "$@"
