"""Building without Debian's pkg-config files, as on a cluster without root
(README, "Building on a cluster"): every dependency given through make's
variables, a variable that does not link named in make's error, detection
through h5pcc when pkg-config knows nothing.

The Debian locations of Open MPI's parallel HDF5 and OpenBLAS stand in for a
module's prefix; a prefix made of symlinks plays HDF5_DIR.
"""
import os
import subprocess
from pathlib import Path

import pytest

from moesim_run import clean_env

REPO = Path(__file__).resolve().parents[2]
DEBIAN_HDF5_INCLUDE = Path("/usr/include/hdf5/openmpi")
DEBIAN_HDF5_LIB = Path("/usr/lib/x86_64-linux-gnu/hdf5/openmpi")
DEBIAN_OPENBLAS_INCLUDE = Path("/usr/include/x86_64-linux-gnu/openblas-pthread")
DEBIAN_OPENBLAS_LIB = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread")
BUILD_TIMEOUT_S = 600
DEPENDENCY_VARIABLES = ("HDF5_DIR", "HDF5_CFLAGS", "HDF5_LIBS", "BLAS_CFLAGS", "BLAS_LIBS",
                        "INIH_CFLAGS", "INIH_LIBS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")

pytestmark = pytest.mark.skipif(
    not (DEBIAN_HDF5_LIB / "libhdf5.so").exists() or not DEBIAN_OPENBLAS_LIB.is_dir(),
    reason="needs Debian's libhdf5-openmpi-dev and libopenblas-dev to stand in for modules")


def no_pkg_config_env(tmp_path):
    """The test's environment with pkg-config knowing no package at all."""
    empty = tmp_path / "no-pkg-config"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in clean_env().items() if k not in DEPENDENCY_VARIABLES}
    env.update(PKG_CONFIG_PATH=str(empty), PKG_CONFIG_LIBDIR=str(empty))
    return env


def make(build_dir, target, env, *variables):
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO),
                           f"BUILD={build_dir}", f"{build_dir}/{target}", *variables],
                          env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)


def module_prefix(tmp_path):
    """An HDF5 installation prefix as a module provides one: include/, lib/."""
    prefix = tmp_path / "hdf5-parallel"
    prefix.mkdir()
    (prefix / "include").symlink_to(DEBIAN_HDF5_INCLUDE)
    (prefix / "lib").symlink_to(DEBIAN_HDF5_LIB)
    return prefix


# oneDNN is optional: ONEDNN=0 (or no oneDNN header) builds the bf16
# emulation alone, says so in `moesim platform`, and refuses --bf16-gemm onednn.
def test_builds_without_onednn_and_emulates_bf16(tmp_path):
    build = tmp_path / "build"
    result = make(build, "moesim", clean_env(), "-j2", "ONEDNN=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MOESIM_HAVE_ONEDNN" not in result.stdout and "-ldnnl" not in result.stdout
    here = subprocess.run([str(build / "moesim"), "platform"], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert "bf16 GEMM (--bf16-gemm auto): emulated (this moesim was built without oneDNN" \
        in here.stdout, here.stdout + here.stderr
    tiny = ["--data-format", "synthetic", "--num-layers", "1", "--hidden-size", "16",
            "--num-attention-heads", "2", "--seq-length", "8", "--num-experts", "2",
            "--moe-ffn-hidden-size", "8", "--ffn-hidden-size", "8", "--micro-batch-size", "2",
            "--eval-iters", "1", "--synthetic-tokens", "4000", "--train-iters", "2",
            "--precision", "bf16"]
    refused = subprocess.run([str(build / "moesim"), "train", *tiny, "--bf16-gemm", "onednn",
                              "--out", str(tmp_path / "refused.h5")],
                             env=clean_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "--bf16-gemm onednn: this moesim was built without oneDNN; install libdnnl-dev" \
        in refused.stderr, refused.stdout + refused.stderr
    run = subprocess.run([str(build / "moesim"), "train", *tiny, "--out", str(tmp_path / "run.h5")],
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bf16 GEMM: emulated" in run.stdout


def test_pkg_config_knows_nothing_here(tmp_path):
    env = no_pkg_config_env(tmp_path)
    for name in ("hdf5-openmpi", "hdf5", "openblas", "blas", "inih"):
        assert subprocess.run(["pkg-config", "--exists", name], env=env).returncode != 0, name


def test_builds_and_trains_with_everything_given_through_variables(tmp_path):
    build = tmp_path / "build"
    variables = [f"HDF5_DIR={module_prefix(tmp_path)}",
                 f"BLAS_CFLAGS=-I{DEBIAN_OPENBLAS_INCLUDE}",
                 f"BLAS_LIBS=-L{DEBIAN_OPENBLAS_LIB} -lopenblas", "INIH_LIBS=-linih"]
    result = make(build, "moesim", no_pkg_config_env(tmp_path), "-j2", *variables)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = (build / "deps" / "settings").read_text()
    assert "HDF5_FROM=HDF5_DIR" in settings and "BLAS_FROM=BLAS_LIBS" in settings, settings
    assert "pkg-config" not in settings, settings
    run = subprocess.run([str(build / "moesim"), "train", "--data-format", "synthetic",
                          "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                          "--seq-length", "8", "--num-experts", "2", "--moe-ffn-hidden-size", "8",
                          "--ffn-hidden-size", "8", "--micro-batch-size", "2", "--eval-iters", "1",
                          "--synthetic-tokens", "4000", "--train-iters", "2",
                          "--out", str(tmp_path / "run.h5")],
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "run.h5").stat().st_size > 0


@pytest.mark.parametrize("variables, named", [
    (["HDF5_DIR=/nonexistent/hdf5"], "HDF5_DIR=/nonexistent/hdf5 does not hold a usable HDF5"),
    ([f"HDF5_CFLAGS=-I{DEBIAN_HDF5_INCLUDE}", "HDF5_LIBS=-lno_such_hdf5"],
     "HDF5_LIBS='-lno_such_hdf5' do not give a usable HDF5"),
    (["BLAS_LIBS=-lno_such_blas"], "BLAS_LIBS='-lno_such_blas'"),
])
def test_a_variable_that_does_not_link_is_named(tmp_path, variables, named):
    good = [f"HDF5_CFLAGS=-I{DEBIAN_HDF5_INCLUDE}", f"HDF5_LIBS=-L{DEBIAN_HDF5_LIB} -lhdf5",
            f"BLAS_CFLAGS=-I{DEBIAN_OPENBLAS_INCLUDE}",
            f"BLAS_LIBS=-L{DEBIAN_OPENBLAS_LIB} -lopenblas"]
    given = {v.split("=", 1)[0] for v in variables}
    if "HDF5_DIR" in given:
        given |= {"HDF5_CFLAGS", "HDF5_LIBS"}  # HDF5_DIR is used when they are not given
    variables = [v for v in good if v.split("=", 1)[0] not in given] + variables
    result = make(tmp_path / "build", "moesim", no_pkg_config_env(tmp_path), *variables)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr
    assert "Building on a cluster" in result.stderr or "README" in result.stderr
    assert not list((tmp_path / "build").rglob("*.o")), "compiled before the check"


def test_without_pkg_config_parallel_hdf5_is_found_through_h5pcc(tmp_path):
    result = make(tmp_path / "build", "deps/ok", no_pkg_config_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    settings = (tmp_path / "build" / "deps" / "settings").read_text()
    assert "HDF5_FROM=h5pcc" in settings and f"-I{DEBIAN_HDF5_INCLUDE}" in settings, settings


def test_missing_mpicc_is_named(tmp_path):
    result = make(tmp_path / "build", "deps/ok", no_pkg_config_env(tmp_path),
                  "CC=no-such-mpicc")
    assert result.returncode != 0
    assert "'no-such-mpicc' is not on PATH" in result.stderr and "module load" in result.stderr


@pytest.mark.parametrize("how", ["MOESIM_NO_APT=1", "no apt-get on PATH"])
def test_make_deps_without_apt_installs_nothing_and_says_what_to_load(tmp_path, how):
    env = no_pkg_config_env(tmp_path)
    if how == "MOESIM_NO_APT=1":
        env["MOESIM_NO_APT"] = "1"
    else:
        env["PATH"] = str(tmp_path / "empty-bin")  # bash built-ins only: no apt-get, no dpkg
    result = subprocess.run(["/bin/bash", str(REPO / "tools" / "deps.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    why = "MOESIM_NO_APT=1" if how == "MOESIM_NO_APT=1" else "no apt-get/dpkg on this machine"
    assert f"make deps: skipped ({why}); installing nothing" in result.stdout
    assert "module load openmpi hdf5/parallel openblas" in result.stdout
    assert "Building on a cluster" in result.stdout
