#!/usr/bin/env bash
# Installs the Debian packages moesim needs, only those missing, so `make run`
# and `make test` work on a fresh Debian 12 machine.
set -euo pipefail

# Without apt (a cluster, another distribution) or with MOESIM_NO_APT=1, the
# environment provides the dependencies: say what to load, install nothing.
if [ "${MOESIM_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 ||
   ! command -v dpkg-query >/dev/null 2>&1; then
  why="MOESIM_NO_APT=1"
  [ "${MOESIM_NO_APT:-0}" = 1 ] || why="no apt-get/dpkg on this machine"
  echo "moesim: make deps: skipped ($why); installing nothing."
  echo "moesim: load these instead (names vary by site; see README.md, \"Building on a cluster\"):"
  echo "moesim:   module load openmpi hdf5/parallel openblas   # MPI (mpicc), parallel HDF5, OpenBLAS"
  echo "moesim:   inih (INI parser), optionally oneDNN (native bf16 GEMM), and for the tests GoogleTest and python3 with h5py, numpy,"
  echo "moesim:   pandas, matplotlib, pytest, nbclient, ipykernel, torch"
  echo "moesim: make finds them through mpicc, h5pcc, pkg-config, or HDF5_DIR / BLAS_LIBS / INIH_LIBS."
  exit 0
fi

packages=(
  openmpi-bin libopenmpi-dev libhdf5-openmpi-dev hdf5-tools libopenblas-dev libdnnl-dev
  libgtest-dev libinih-dev pkg-config fortunes
  iproute2 procps
  python3-h5py python3-numpy python3-pandas python3-matplotlib python3-pytest
  python3-nbclient python3-ipykernel jupyter-nbconvert python3-torch
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "moesim: installing missing Debian packages: ${missing[*]}"
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
