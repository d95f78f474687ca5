"""launch: one point's command line (mpirun or srun around build/moesim) and
running it with its output in a log, a timeout, and no process left behind.

The launcher runs in a session of its own. mpirun puts each rank in a process
group of its own, so killing mpirun's group is not enough: stopping a point
sends SIGTERM to the launcher (which tears its ranks down cleanly), then after
a grace period SIGKILL to every process still in the session."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHERS = ("mpirun", "srun")
GRACE_S = 5.0          # from SIGTERM to the launcher until SIGKILL to the session
KILL_WAIT_S = 10.0     # for SIGKILLed processes to go away


def clean_env() -> dict:
    """The environment for moesim: none of an enclosing mpirun's or srun
    step's OMPI_*/PMIX_* variables, one BLAS thread per rank, and Open MPI
    allowed to run as root (it refuses otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env["OPENBLAS_NUM_THREADS"] = "1"
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def default_launcher(environ) -> str:
    return "srun" if environ.get("SLURM_JOB_ID") else "mpirun"


def command(launcher: str, world_size: int, moesim, ini, record) -> list:
    if launcher == "srun":
        # Open MPI under srun needs the PMIx plugin to wire up its ranks.
        prefix = ["srun", "--mpi=pmix", "-n", str(world_size)]
    else:
        prefix = ["mpirun", "-n", str(world_size)]
        if world_size > (os.cpu_count() or 1):
            prefix.append("--oversubscribe")
    # The runner reruns only points whose record is not complete, so the record
    # it replaces is a failed or partial one, never a finished run.
    return [*prefix, str(moesim), "train", "--config", str(ini), "--out", str(record),
            "--overwrite", "1"]


@dataclass
class Outcome:
    returncode: int
    elapsed_s: float
    timed_out: bool


def run_point(cmd: list, log_path: Path, timeout_s: float) -> Outcome:
    """Runs cmd with stdout and stderr appended to log_path (after a first
    line with the command). On timeout, or on an exception such as
    KeyboardInterrupt while waiting, stops every process of the run; the
    exception is re-raised after."""
    log_path.write_text(f"$ {shlex.join(cmd)}\n")
    with open(log_path, "a") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=clean_env(),
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
            log.write(f"\n# sweep: stopped after the timeout of {timeout_s:g} s\n")
        except BaseException:
            stop(proc)
            log.write("\n# sweep: interrupted; the point was stopped\n")
            raise
        finally:
            kill_session(proc.pid)
    return Outcome(proc.returncode, time.monotonic() - start, timed_out)


def stop(proc: subprocess.Popen):
    """SIGTERM to the launcher's process group, then SIGKILL to whatever is
    left of its session. A second Ctrl-C skips the grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    kill_session(proc.pid)
    proc.wait()


def session_pids(session_id: int) -> list:
    """Live (not zombie) processes of a session, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses):
        # state, ppid, pgrp, session, ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(session_id: int):
    """SIGKILL every process of the session until none is left (bounded)."""
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := session_pids(session_id):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of a stopped point survived SIGKILL for "
                               f"{KILL_WAIT_S:g} s; kill them by hand")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
