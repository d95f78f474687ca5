#!/usr/bin/env bash
# make test-multinode: moesim on an emulated two-node cluster on one machine
# (cluster.sh: network namespaces, veth, a bridge, tbf-shaped links), launched
# by mpirun through launch_agent.sh. Checks that
#   1. 4 ranks on 2 nodes x 2 ranks train bit-identically to 1 rank with the
#      same global batch, at EP 4 (ranks by slot: 0,1 on node0, 2,3 on node1)
#      and at EP 2 (ranks by node: 0,2 on node0, 1,3 on node1, so each EP
#      group spans both nodes), with the hierarchical dispatcher on the nodes
#      Open MPI found (EP 4) and with expert work overlapping the exchange
#      and the gradient reduction overlapping backward (EP 2, 2 chunks,
#      --overlap-grad-reduce 1); the records name the node of every rank;
#   2. Open MPI's verbose output shows TCP between nodes, to the veth
#      addresses only, and vader (shared memory) within a node; the veth
#      counters carry at least the bytes the record says crossed nodes;
#   3. a rank killed with SIGKILL on node 1 ends the job (mpirun exits
#      non-zero) within MULTINODE_KILL_LIMIT_S, leaving no process on any node;
#   4. `cluster.sh down` leaves no namespace, link, process or state behind.
# The cluster is always taken down on exit. Needs root and build/moesim.
# Knobs: MULTINODE_RATE (link rate, default 1gbit), MULTINODE_KEEP=1 keeps
# the scratch directory (logs, records).
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python=/usr/bin/python3
moesim=$root/build/moesim
cluster=tests/multinode/cluster.sh
started_s=$SECONDS
passed=0
kill_limit_s=${MULTINODE_KILL_LIMIT_S:-15}
run_timeout_s=60
mpirun_pid=

# A cluster of its own (id, subnet, state), apart from one made by hand
# with cluster.sh's defaults.
export MOESIM_CLUSTER_ID=test MOESIM_CLUSTER_NODES=2 MOESIM_CLUSTER_SLOTS=2
export MOESIM_CLUSTER_NET=10.213.15 MOESIM_CLUSTER_RATE=${MULTINODE_RATE:-1gbit}
export MOESIM_CLUSTER_DIR=/tmp/moesim-cluster-test
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
node0="moesim-test-node0"
node1="moesim-test-node1"
address0=$MOESIM_CLUSTER_NET.1
address1=$MOESIM_CLUSTER_NET.2

if [ "$(id -u)" -ne 0 ]; then
  echo "test-multinode: run as root: it creates network namespaces and links"
  exit 1
fi
if [ ! -x "$moesim" ]; then
  echo "test-multinode: $moesim missing: run 'make build/moesim' first"
  exit 1
fi
scratch=$(mktemp -d /tmp/moesim-multinode.XXXXXX)

cleanup() {
  trap - ERR
  set +e
  if [ -n "$mpirun_pid" ]; then
    kill -TERM "$mpirun_pid" 2>/dev/null # timeout passes it on to mpirun
    wait "$mpirun_pid" 2>/dev/null
  fi
  bash "$cluster" down
  if [ "${MULTINODE_KEEP:-0}" = 1 ]; then
    echo "test-multinode: kept $scratch"
  else
    rm -rf "$scratch"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  trap - ERR
  echo "test-multinode: FAILED: $*"
  bash "$cluster" status 2>&1 | sed 's/^/  /' || true
  echo "test-multinode: $passed passed, 1 failed"
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND exited with status $?"' ERR

mpi_cluster=(bash tests/multinode/cluster_mpirun.sh)

tiny=(
  --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --num-experts 4
  --moe-router-topk 2 --moe-ffn-hidden-size 32 --ffn-hidden-size 64 --data-format synthetic
  --synthetic-tokens 20000 --moe-group-size 16 --eval-iters 1 --log-interval 1
  --eval-interval 10 --progress-interval 1000 --moe-expert-capacity-factor 1.0
)
steps=40
micro_batch=3 # per rank; the 1-rank run takes 4 x 3

# Runs "${@:3}" with a time limit of $1 s, output to $2; names the log on failure.
run_logged() {
  local limit_s=$1 log=$2 status=0
  shift 2
  timeout -k 5 "$limit_s" "$@" >"$log" 2>&1 || status=$?
  [ "$status" -eq 0 ] || {
    tail -n 30 "$log"
    [ "$status" -eq 124 ] && fail "$log: timed out after $limit_s s"
    fail "$log: exit status $status"
  }
}

# Bytes sent by the bridge-side ends of the node links (into the nodes).
veth_tx_bytes() {
  echo $(($(cat /sys/class/net/moesim-test-v0/statistics/tx_bytes) +
    $(cat /sys/class/net/moesim-test-v1/statistics/tx_bytes)))
}

# PIDs of moesim processes inside namespace $1.
node_ranks() {
  local pids
  pids=$(ip netns pids "$1" | sort)
  comm -12 <(pgrep -f "^$moesim " | sort) <(echo "$pids") || true
}

# Waits up to $1 s for "${@:2}" to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

no_process_in_nodes() {
  [ -z "$(ip netns pids "$node0")$(ip netns pids "$node1")" ]
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

echo "test-multinode: cluster up (rate $MOESIM_CLUSTER_RATE)"
bash "$cluster" up
bash "$cluster" status >/dev/null || fail "cluster.sh status after up"

# 1. One training on three layouts.
run_logged "$run_timeout_s" "$scratch/ref.log" "$moesim" train "${tiny[@]}" --train-iters "$steps" \
  --micro-batch-size $((4 * micro_batch)) --out "$scratch/ref.h5"
tx_before=$(veth_tx_bytes)
t0=$(now_ms)
run_logged "$run_timeout_s" "$scratch/ep4.log" "${mpi_cluster[@]}" -n 4 --map-by slot \
  --mca btl_base_verbose 100 "$moesim" train "${tiny[@]}" --train-iters "$steps" \
  --micro-batch-size "$micro_batch" --expert-model-parallel-size 4 --out "$scratch/ep4.h5"
ep4_ms=$(($(now_ms) - t0))
tx_bytes=$(($(veth_tx_bytes) - tx_before))
t0=$(now_ms)
run_logged "$run_timeout_s" "$scratch/ep2.log" "${mpi_cluster[@]}" -n 4 --map-by node \
  "$moesim" train "${tiny[@]}" --train-iters "$steps" \
  --micro-batch-size "$micro_batch" --expert-model-parallel-size 2 --out "$scratch/ep2.h5"
ep2_ms=$(($(now_ms) - t0))
# The node-aware exchange on nodes Open MPI found itself (no --ranks-per-node),
# and expert work overlapping an exchange that crosses the link.
run_logged "$run_timeout_s" "$scratch/hier.log" "${mpi_cluster[@]}" -n 4 --map-by slot \
  "$moesim" train "${tiny[@]}" --train-iters "$steps" --micro-batch-size "$micro_batch" \
  --expert-model-parallel-size 4 --moe-token-dispatcher-type hierarchical --out "$scratch/hier.h5"
grep -q "exchange: hierarchical dispatcher, 2 node(s)$" "$scratch/hier.log" ||
  fail "$scratch/hier.log: the hierarchical run did not see 2 nodes: $(grep '^exchange:' "$scratch/hier.log")"
run_logged "$run_timeout_s" "$scratch/overlap.log" "${mpi_cluster[@]}" -n 4 --map-by node \
  "$moesim" train "${tiny[@]}" --train-iters "$steps" --micro-batch-size "$micro_batch" \
  --expert-model-parallel-size 2 --moe-overlap-chunks 2 --overlap-grad-reduce 1 --out "$scratch/overlap.h5"
echo "test-multinode: 4 ranks on 2 nodes, $steps steps: EP 4 in $ep4_ms ms (verbose), EP 2 in $ep2_ms ms"
$python tests/multinode/compare_records.py "$scratch/ref.h5" \
  "$scratch/ep4.h5:$node0,$node0,$node1,$node1" "$scratch/ep2.h5:$node0,$node1,$node0,$node1" \
  "$scratch/hier.h5:$node0,$node0,$node1,$node1" "$scratch/overlap.h5:$node0,$node1,$node0,$node1" ||
  fail "the 2-node runs differ from the 1-rank run (a real layout bug: moesim promises bit-identical records)"
passed=$((passed + 1))

# 2. Which transport carried what.
$python tests/multinode/check_transports.py "$scratch/ep4.log" "$scratch/ep4.h5" \
  "$MOESIM_CLUSTER_NET" "$node0=$address0" "$node1=$address1" ||
  fail "Open MPI's btl output ($scratch/ep4.log) does not show tcp between nodes and vader within"
cross_bytes=$($python - "$scratch/ep4.h5" <<'EOF'
import sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    sent = f["traffic/dispatch_bytes"][()]  # [step, from rank, to rank]
    node = list(f.attrs["hostnames"])
world = len(node)
print(sum(int(sent[:, a, b].sum()) for a in range(world) for b in range(world) if node[a] != node[b]))
EOF
)
echo "test-multinode: node links carried $tx_bytes bytes into the nodes; the record's cross-node dispatch alone: $cross_bytes"
[ "$cross_bytes" -gt 0 ] || fail "the EP 4 record has no cross-node dispatch traffic"
[ "$tx_bytes" -ge "$cross_bytes" ] ||
  fail "the veth links carried $tx_bytes bytes, less than the $cross_bytes the dispatch sent across nodes"
passed=$((passed + 1))

# 3. A rank dying on node 1 ends the job on both nodes.
timeout -k 5 "$run_timeout_s" "${mpi_cluster[@]}" -n 4 --map-by slot "$moesim" train "${tiny[@]}" \
  --train-iters 1000000 \
  --micro-batch-size "$micro_batch" --expert-model-parallel-size 4 --out "$scratch/killed.h5" \
  >"$scratch/killed.log" 2>&1 &
mpirun_pid=$! # timeout's, which exits with mpirun's status
has_two_ranks() { [ "$(node_ranks "$node1" | wc -l)" -eq 2 ] && [ -s "$scratch/killed.h5" ]; }
wait_for 30 has_two_ranks || fail "the long run did not start 2 ranks on $node1 within 30 s"
sleep 1 # into training, past start-up
victim=$(node_ranks "$node1" | head -n 1)
kill -KILL "$victim"
t0=$(now_ms)
mpirun_gone() { ! kill -0 "$mpirun_pid" 2>/dev/null; }
wait_for "$kill_limit_s" mpirun_gone || {
  tail -n 20 "$scratch/killed.log"
  fail "mpirun still running $kill_limit_s s after rank PID $victim on $node1 got SIGKILL"
}
status=0
wait "$mpirun_pid" || status=$?
mpirun_pid=
exit_ms=$(($(now_ms) - t0))
[ "$status" -ne 0 ] || fail "mpirun exited 0 although rank PID $victim was killed"
wait_for 5 no_process_in_nodes ||
  fail "processes left in the nodes after mpirun exited: $node0: $(ip netns pids "$node0" | tr '\n' ' ') $node1: $(ip netns pids "$node1" | tr '\n' ' ')"
left=$(pgrep -f "^$moesim " || true)
[ -z "$left" ] || fail "moesim processes left: $left"
echo "test-multinode: SIGKILL of rank PID $victim on $node1: mpirun exited $status after $exit_ms ms, no process left on either node"
passed=$((passed + 1))

# 4. Down leaves nothing.
bash "$cluster" down
[ -z "$(ip netns list | grep '^moesim-test-' || true)" ] || fail "namespaces left: $(ip netns list)"
[ -z "$(ip -o link show | grep 'moesim-test-' || true)" ] || fail "links left: $(ip -o link show | grep moesim-test-)"
[ ! -e "$MOESIM_CLUSTER_DIR" ] || fail "$MOESIM_CLUSTER_DIR left"
[ -z "$(pgrep -f "^$moesim " || true)" ] || fail "moesim processes left after down"
left=$(ls -d /tmp/ompi.moesim-test-* /dev/shm/*moesim-test-* 2>/dev/null || true)
[ -z "$left" ] || fail "Open MPI files of the nodes left: $left"
passed=$((passed + 1))

echo "test-multinode: done in $((SECONDS - started_s)) s"
echo "test-multinode: $passed passed, 0 failed"
