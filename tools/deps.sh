#!/usr/bin/env bash
# Installs the Debian packages moesim needs, only those missing, so `make run`
# and `make test` work on a fresh Debian 12 machine.
set -euo pipefail
packages=(
  openmpi-bin libopenmpi-dev libhdf5-openmpi-dev hdf5-tools libopenblas-dev
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
