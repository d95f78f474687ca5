# shellcheck shell=bash
# A real one-machine SLURM cluster for tests (Debian's slurm-wlm 22.05 and
# munge), sourced by test_slurm.sh. Provides:
#   cluster_install      installs slurm-wlm and munge if missing (needs root)
#   cluster_reap_stale   stops the daemons of clusters whose test run died
#                        without cleaning up (SIGKILL), and removes their files
#   cluster_start DIR    starts munged, slurmctld and slurmd with every file
#                        under DIR; exports SLURM_CONF; waits for an idle node
#   cluster_stop         cancels the cluster's jobs, stops its daemons by PID
#   cluster_logs         prints the end of every daemon log
# The cluster has its own munge key and socket and its own free TCP ports, so
# it shares nothing with a system munged or Slurm, and two test runs on one
# machine do not meet. Daemons run as root (SlurmUser=SlurmdUser=root).
# A requeued job starts again within 6 s (cred_expire, sched_interval).

CLUSTER_DIR=
CLUSTER_PIDS=()

cluster_install() {
  local missing=() package
  for package in slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "cluster: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Starts "$@" in its own session, output to $CLUSTER_DIR/log/NAME.out, and
# records its PID. Without job control a background child is not a process
# group leader, so setsid execs in place and $! is the daemon itself.
cluster_daemon() {
  local name=$1
  shift
  setsid "$@" >"$CLUSTER_DIR/log/$name.out" 2>&1 </dev/null &
  CLUSTER_PIDS+=("$!")
}

# Waits up to $1 seconds for the command "${@:2}" to succeed.
cluster_wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

cluster_munge_works() {
  munge -n -S "$CLUSTER_DIR/run/munge.socket" | unmunge -S "$CLUSTER_DIR/run/munge.socket"
}

# A stopped child stays a zombie until `wait`, and kill -0 still finds it.
cluster_process_gone() {
  local state
  state=$(ps -o stat= -p "$1")
  [ -z "$state" ] || [[ $state == Z* ]]
}

cluster_node_idle() {
  [ "$(sinfo -h -N -o %T)" = idle ]
}

# A cluster directory of a test run that died without its EXIT trap (SIGKILL)
# still has daemons running: each is stopped if its pid file names a process
# whose command line mentions the directory, and the directory is removed
# once its owner (the test's process, in run/owner.pid) is gone.
cluster_reap_stale() {
  local dir owner name pid
  for dir in "$@"; do
    [ -f "$dir/run/owner.pid" ] || continue
    owner=$(cat "$dir/run/owner.pid")
    [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null && continue
    for name in slurmd slurmctld munged; do
      pid=$(cat "$dir/run/$name.pid" 2>/dev/null) || continue
      [ -n "$pid" ] || continue
      grep -qF "$dir/" "/proc/$pid/cmdline" 2>/dev/null || continue
      echo "cluster: stopping $name (pid $pid) left running by a dead test run in $dir"
      kill -TERM "$pid" 2>/dev/null || continue
      cluster_wait_for 10 cluster_process_gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
  done
}

cluster_start() {
  CLUSTER_DIR=$1
  local dir=$1 first_job_id host memory_mb node ports
  # A requeued job may start again only cred_expire + 1 s later (120 s by
  # default: two idle minutes per requeue in a test); the credential of a step
  # on this one machine is checked within a second of its creation. Once it
  # may, only the main scheduling loop starts it (backfill skips it), every
  # sched_interval (60 s by default).
  local cred_expire_s=5
  # munged refuses a socket whose directories are not searchable by all.
  chmod 755 "$dir"
  mkdir -p "$dir/key" "$dir/run" "$dir/state" "$dir/spool" "$dir/log" "$dir/tmp"
  chmod 700 "$dir/key"
  chmod 755 "$dir/run"
  # The test's own process: while it lives, the cluster is not stale.
  echo "$$" >"$dir/run/owner.pid"

  mungekey --create --keyfile="$dir/key/munge.key" || return 1
  cluster_daemon munged munged --foreground --socket="$dir/run/munge.socket" \
    --key-file="$dir/key/munge.key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/key/munged.seed"
  cluster_wait_for 10 cluster_munge_works || {
    echo "cluster: munged did not answer on $dir/run/munge.socket within 10 s"
    return 1
  }

  host=$(hostname -s)
  # The node as slurmd itself detects it (on a 2-core machine: CPUs=2
  # Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1), so it
  # never drains for claiming more than it has; memory a little under total.
  node=$(slurmd -C | head -n 1 | sed 's/ RealMemory=[0-9]*//')
  memory_mb=$(free -m | awk '/^Mem:/ { print int($2 * 0.95) }')
  # Open MPI names its shared-memory segments after the PMIx namespace, which
  # holds the job id: two clusters on one machine must not both start at 1.
  first_job_id=$((1000 + RANDOM * 30))
  read -r -a ports < <(/usr/bin/python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in sockets))')

  cat >"$dir/slurm.conf" <<EOF
ClusterName=moesim-test
SlurmctldHost=$host
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket,cred_expire=$cred_expire_s
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
TmpFS=$dir/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=pmix
MailProg=/bin/true
KillWait=5
SchedulerParameters=bf_interval=1,sched_interval=1
FirstJobId=$first_job_id
$node RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf

  cluster_daemon slurmctld slurmctld -D -f "$SLURM_CONF"
  cluster_wait_for 20 scontrol ping || {
    echo "cluster: slurmctld did not answer within 20 s"
    return 1
  }
  cluster_daemon slurmd slurmd -D -f "$SLURM_CONF"
  cluster_wait_for 30 cluster_node_idle || {
    echo "cluster: node $host not idle within 30 s:"
    sinfo -N -l
    return 1
  }
}

cluster_stop() {
  local jobs i pid
  if [ -n "${SLURM_CONF:-}" ] && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %A 2>/dev/null)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs
      cluster_wait_for 30 test -z "$(squeue -h -o %A)" ||
        echo "cluster: jobs $jobs still listed 30 s after scancel; their processes: $(scontrol listpids 2>&1)"
    fi
  fi
  # slurmd, slurmctld, munged: the reverse of the start order.
  for ((i = ${#CLUSTER_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${CLUSTER_PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    cluster_wait_for 10 cluster_process_gone "$pid" || kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  CLUSTER_PIDS=()
}

# A daemon's NAME.out (its stderr) repeats NAME.log, so it is shown only when
# the log is empty: the daemon died before opening it.
cluster_logs() {
  local out log
  for out in "$CLUSTER_DIR"/log/*.out; do
    log=${out%.out}.log
    [ -s "$log" ] || log=$out
    [ -s "$log" ] || continue
    echo "----- last lines of $log"
    tail -n 25 "$log"
  done
}
