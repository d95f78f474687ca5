"""Launching build/moesim from tests: a plain subprocess (an MPI singleton) or
under mpirun, with the environment of any enclosing mpirun removed."""
import os
import signal
import subprocess
import time
from pathlib import Path

BUILD = Path(os.environ.get("MOESIM_BUILD", Path(__file__).resolve().parents[2] / "build"))


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS="1")
    return env


def flags(options):
    return [arg for key, value in options.items() for arg in (f"--{key}", str(value))]


def run_moesim(subcommand, options, timeout=600):
    return subprocess.run([str(BUILD / "moesim"), subcommand, *flags(options)],
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def run_mpi(ranks, subcommand, options, timeout=120):
    """Runs build/moesim under `mpirun -n ranks` (oversubscribed, unbound) and
    returns a CompletedProcess with .elapsed (seconds). mpirun runs in its own
    session; on timeout that whole process group is killed (so no rank is left
    spinning) and subprocess.TimeoutExpired is raised."""
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
           str(BUILD / "moesim"), subcommand, *flags(options)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    result.elapsed = time.monotonic() - start
    return result
