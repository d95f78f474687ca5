"""Launching build/moesim from tests: a plain subprocess (an MPI singleton),
with the environment of any enclosing mpirun removed."""
import os
import subprocess
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
