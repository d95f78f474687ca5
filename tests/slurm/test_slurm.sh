#!/usr/bin/env bash
# make test-slurm: the SLURM templates on a real one-machine cluster (Debian's
# slurm-wlm and munge, installed if missing). experiments/slurm/run.sbatch runs
# a tiny synthetic model on 2 tasks; once experiments/sweep exists,
# experiments/slurm/sweep.sbatch runs experiments/sweeps/two_point.ini. Each
# job must end COMPLETED with exit code 0 and leave records whose status is
# 'complete' at the expected world size. Then preemption: a run.sbatch job
# stopped by SIGUSR1 (requeued by the script) and by `scontrol requeue`
# (requeued by SLURM) must end, resumed twice, with a record and a final
# checkpoint equal to an uninterrupted run.sbatch job's. Needs root and
# build/moesim. Every daemon it started is stopped by PID, and its scratch
# directory removed, on any exit (TEST_SLURM_KEEP=1 keeps the directory: logs,
# records, slurm.conf); a run killed with SIGKILL leaves its daemons to the
# next run, which stops them. Time limits (seconds): each wait for a job or a
# checkpoint TEST_SLURM_RUN_TIMEOUT (default 120), the sweep
# TEST_SLURM_SWEEP_TIMEOUT (default 600).
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/slurm/cluster.sh
source tests/slurm/cluster.sh

run_timeout_s=${TEST_SLURM_RUN_TIMEOUT:-120}
sweep_timeout_s=${TEST_SLURM_SWEEP_TIMEOUT:-600}
spec=experiments/sweeps/two_point.ini
python=/usr/bin/python3
started_s=$SECONDS
passed=0
skipped=0
job_id=
job_log=

if [ "$(id -u)" -ne 0 ]; then
  echo "test-slurm: run as root: it installs packages and runs munged, slurmctld and slurmd as root"
  exit 1
fi
if [ ! -x build/moesim ]; then
  echo "test-slurm: build/moesim missing: run 'make build/moesim' first"
  exit 1
fi
# A surrounding allocation's variables would leak into our jobs.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^SLURM_' || true)

cluster_reap_stale /tmp/moesim-slurm.*
scratch=$(mktemp -d /tmp/moesim-slurm.XXXXXX)
mkdir -p "$scratch/jobs" "$scratch/runs"

cleanup() {
  trap - ERR
  set +e
  cluster_stop
  if [ "${TEST_SLURM_KEEP:-0}" = 1 ]; then
    rm -f "$scratch/run/owner.pid" # kept on purpose: not for cluster_reap_stale
    echo "test-slurm: kept $scratch (daemons stopped)"
  else
    rm -rf "$scratch"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  trap - ERR
  echo "test-slurm: FAILED: $*"
  if [ -n "$job_id" ]; then
    echo "----- scontrol show job $job_id"
    scontrol show job "$job_id" 2>&1 || true
  fi
  if [ -n "$job_log" ] && [ -f "$job_log" ]; then
    echo "----- job log $job_log"
    cat "$job_log"
  fi
  cluster_logs
  echo "test-slurm: $passed passed, 1 failed"
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND exited with status $?"' ERR

# The value of field $1 (JobState, ExitCode, Restarts, ...) of job $job_id.
job_field() {
  local info
  info=$(scontrol show job -o "$job_id") || fail "scontrol lost job $job_id"
  sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $info"
}

# Waits up to $1 seconds for job $job_id to leave the queue; it must end
# COMPLETED with exit code 0:0 after $2 restarts (requeues).
wait_for_completion() {
  local timeout_s=$1 restarts=$2 deadline state
  deadline=$((SECONDS + timeout_s))
  while :; do
    state=$(job_field JobState)
    case $state in
      PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED) ;;
      COMPLETED)
        [ "$(job_field ExitCode)" = 0:0 ] || fail "job $job_id COMPLETED with exit code $(job_field ExitCode)"
        [ "$(job_field Restarts)" = "$restarts" ] ||
          fail "job $job_id COMPLETED after $(job_field Restarts) restarts, not $restarts"
        break
        ;;
      *) fail "job $job_id ended $state with exit code $(job_field ExitCode)" ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      scancel "$job_id"
      fail "job $job_id still $state after $timeout_s s (set TEST_SLURM_RUN_TIMEOUT / TEST_SLURM_SWEEP_TIMEOUT for slower machines)"
    fi
    sleep 0.5
  done
  echo "test-slurm: job $job_id COMPLETED, exit code 0:0, $restarts restart(s), in $((SECONDS + timeout_s - deadline)) s"
}

# Submits "$@" with sbatch and waits up to $1 seconds for the job to leave
# the queue; the job must end COMPLETED with exit code 0:0.
submit_and_wait() {
  local timeout_s=$1
  shift
  job_id=$(sbatch --parsable "$@") || fail "sbatch $* was refused"
  echo "test-slurm: submitted job $job_id: sbatch $*"
  wait_for_completion "$timeout_s" 0
}

# Waits up to $3 seconds until job $job_id runs attempt $2 (its restart
# count) and the checkpoint directory $1 names a step at or past $4.
wait_for_checkpoint() {
  local save=$1 restarts=$2 timeout_s=$3 step=$4 deadline latest state
  deadline=$((SECONDS + timeout_s))
  while :; do
    state=$(job_field JobState)
    latest=$(cat "$save/latest_checkpointed_iteration.txt" 2>/dev/null || true)
    if [ "$state" = RUNNING ] && [ "$(job_field Restarts)" = "$restarts" ] &&
      [[ $latest =~ ^[0-9]+$ ]] && [ "$latest" -ge "$step" ]; then
      break
    fi
    case $state in
      PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED) ;;
      *) fail "job $job_id ended $state (exit code $(job_field ExitCode)) before attempt $restarts saved step $step" ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] ||
      fail "job $job_id: no checkpoint at or past step $step of attempt $restarts within $timeout_s s (state $state, restarts $(job_field Restarts), latest checkpoint '${latest}')"
    sleep 0.1
  done
  echo "test-slurm: job $job_id attempt $restarts saved step $latest"
}

cluster_install || fail "apt-get install slurm-wlm munge failed"
echo "test-slurm: starting munged, slurmctld, slurmd in $scratch"
cluster_start "$scratch" || fail "the one-machine cluster did not start"
echo "test-slurm: node $(sinfo -h -N -o '%N %T, %c CPUs, %m MB') after $((SECONDS - started_s)) s"

# One run: the INI gives the model, EXTRA_FLAGS overrides its train-iters,
# so the record's train_iters 6 shows both knobs reached moesim.
cat >"$scratch/tiny.ini" <<'EOF'
num-layers = 2
hidden-size = 32
num-attention-heads = 2
seq-length = 16
num-experts = 4
moe-ffn-hidden-size = 32
ffn-hidden-size = 64
train-iters = 4
eval-interval = 3
eval-iters = 1
data-format = synthetic
synthetic-tokens = 20000
micro-batch-size = 2
EOF
job_log=$scratch/jobs/moesim-tiny.out
CONFIG=$scratch/tiny.ini EXTRA_FLAGS="--train-iters 6" OUT_DIR=$scratch/runs \
  submit_and_wait "$run_timeout_s" -n 2 -J moesim-tiny -t 5 -o "$scratch/jobs/%x.out" \
  experiments/slurm/run.sbatch
record=$scratch/runs/moesim-tiny-$job_id.h5
[ -f "$record" ] || fail "run.sbatch left no record at $record; $scratch/runs has: $(ls "$scratch/runs")"
$python tests/slurm/check_record.py --world-size 2 --train-iters 6 "$record" ||
  fail "the record of job $job_id is not a complete 2-rank run of 6 steps"
grep -q "status complete" "$job_log" || fail "the job log does not end with moesim info of the record"
grep -q "^platform: OpenBLAS .* | kernel " "$job_log" || fail "the job log has no platform line"
passed=$((passed + 1))

# moesim restarts itself (execv) to change the OpenBLAS kernel; under srun
# each task must come back as the same PMIx task. The restart that drops a
# kernel failing the self-check is the one this machine can take for real
# when the CPU lacks AVX-512: SkylakeX then dies of SIGILL in the check.
if ! grep -qw avx512f /proc/cpuinfo; then
  job_log=$scratch/jobs/moesim-restart.out
  submit_and_wait "$run_timeout_s" -n 2 -J moesim-restart -t 5 -o "$job_log" --wrap \
    "srun --mpi=pmix env MOESIM_BLAS_KERNEL_STATE=chosen:Haswell OPENBLAS_CORETYPE=SkylakeX build/moesim platform"
  grep -q "SkylakeX failed the self-check" "$job_log" ||
    fail "moesim did not restart with OpenBLAS's own kernel under srun"
  [ "$(grep -c "failed moesim's self-check" "$job_log")" = 2 ] ||
    fail "both tasks should have restarted once"
  passed=$((passed + 1))
else
  echo "test-slurm: restart under srun not run: this CPU runs every kernel moesim knows"
  skipped=$((skipped + 1))
fi

if [ -x experiments/sweep ] && [ -f "$spec" ]; then
  # The points, with their world sizes, as the runner's own spec parser sees them.
  mapfile -t points < <($python -B - "$spec" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "experiments")
from sweep_lib.spec import load_spec

for point in load_spec(Path(sys.argv[1])).points:
    print(point.name, point.world_size)
EOF
  )
  [ ${#points[@]} -gt 0 ] || fail "experiments/sweep_lib found no points in $spec"
  world_size=$(printf '%s\n' "${points[@]}" | awk '$2 > max { max = $2 } END { print max }')
  job_log=$scratch/jobs/moesim-sweep.out
  SPEC=$spec SWEEP_OUT=$scratch/sweep \
    submit_and_wait "$sweep_timeout_s" -n "$world_size" -J moesim-sweep -t 30 -o "$job_log" \
    experiments/slurm/sweep.sbatch
  for point in "${points[@]}"; do
    read -r name point_world_size <<<"$point"
    $python tests/slurm/check_record.py --world-size "$point_world_size" "$scratch/sweep/$name.h5" ||
      fail "sweep point $name has no complete record of world size $point_world_size; $scratch/sweep has: $(ls "$scratch/sweep")"
  done
  passed=$((passed + 1))
else
  echo "test-slurm: sweep.sbatch not run: experiments/sweep or $spec does not exist yet"
  skipped=$((skipped + 1))
fi

# Preemption (issue 13): one run.sbatch job stopped twice and requeued,
# ending equal to an uninterrupted run.sbatch job of the same config. First
# SIGUSR1 to the batch shell only, as --signal=B:USR1 sends it: the shell
# passes it to srun, srun to each rank once (a second one would kill the rank
# and fail the job), moesim saves and exits 75, the shell requeues the job.
# Then `scontrol requeue`: SLURM sends SIGTERM to the ranks and requeues the
# job itself; the ranks save within KillWait, or the periodic checkpoint is
# the resume point. Each attempt resumes from the newest checkpoint.
preempt_steps=2000
cat >"$scratch/preempt.ini" <<EOF
num-layers = 2
hidden-size = 32
num-attention-heads = 2
seq-length = 16
num-experts = 4
moe-ffn-hidden-size = 32
ffn-hidden-size = 64
train-iters = $preempt_steps
eval-interval = 500
eval-iters = 1
progress-interval = 500
data-format = synthetic
synthetic-tokens = 20000
micro-batch-size = 2
save-interval = 50
save-keep = 2
EOF
job_log=$scratch/jobs/moesim-reference.out
CONFIG=$scratch/preempt.ini OUT_DIR=$scratch/runs \
  submit_and_wait "$run_timeout_s" -n 2 -J moesim-reference -t 10 -o "$job_log" experiments/slurm/run.sbatch
reference=$scratch/runs/moesim-reference-$job_id

job_log=$scratch/jobs/moesim-preempt.out
usr1_stop="stopped by User defined signal 1 after step"
job_id=$(CONFIG=$scratch/preempt.ini OUT_DIR=$scratch/runs \
  sbatch --parsable -n 2 -J moesim-preempt -t 10 -o "$job_log" experiments/slurm/run.sbatch) ||
  fail "sbatch experiments/slurm/run.sbatch was refused"
echo "test-slurm: submitted job $job_id: run.sbatch of $preempt_steps steps, to be stopped twice"
preempted=$scratch/runs/moesim-preempt-$job_id
wait_for_checkpoint "$preempted.ckpt" 0 "$run_timeout_s" 400
scancel --signal=USR1 --batch "$job_id"
echo "test-slurm: scancel --signal=USR1 --batch $job_id"
wait_for_checkpoint "$preempted.ckpt" 1 "$run_timeout_s" 0
[ "$(grep -c "$usr1_stop" "$job_log")" = 1 ] || fail "attempt 0 did not stop on SIGUSR1"
first_stop=$(sed -n "s/.*$usr1_stop \([0-9]*\) .*/\1/p" "$job_log")
wait_for_checkpoint "$preempted.ckpt" 1 "$run_timeout_s" $((first_stop + 400))
scontrol requeue "$job_id"
echo "test-slurm: scontrol requeue $job_id"
wait_for_completion "$run_timeout_s" 2
mapfile -t resume_steps < <(sed -n "s|^resumed from $preempted.ckpt at step \([0-9]*\) .*|\1|p" "$job_log")
[ ${#resume_steps[@]} = 2 ] ||
  fail "job $job_id should have resumed twice from $preempted.ckpt; its log has ${#resume_steps[@]} 'resumed from' lines"
[ "$(grep -c "$usr1_stop" "$job_log")" = 1 ] || fail "moesim should have stopped once on SIGUSR1"
[ "$(grep -c "^run.sbatch: requeued job $job_id" "$job_log")" = 1 ] ||
  fail "run.sbatch should have requeued job $job_id once, after SIGUSR1, and not after SLURM's SIGTERM"
if grep -q "stopped by Terminated after step" "$job_log"; then
  echo "test-slurm: attempt 1 stopped on SLURM's SIGTERM and saved; resumed at steps ${resume_steps[*]}"
else
  echo "test-slurm: attempt 1 was killed before it saved; resumed from the periodic checkpoints at steps ${resume_steps[*]}"
fi
$python tests/slurm/check_resumed.py --resume-steps "$(IFS=,; echo "${resume_steps[*]}")" \
  "$reference.h5" "$reference.ckpt" "$preempted.h5" "$preempted.ckpt" ||
  fail "the requeued job $job_id did not end as the uninterrupted job"
passed=$((passed + 1))

echo "test-slurm: done in $((SECONDS - started_s)) s"
echo "test-slurm: $passed passed, 0 failed, $skipped skipped"
