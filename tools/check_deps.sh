#!/usr/bin/env bash
# Called by make before compiling: MPI's compiler wrapper, HDF5, BLAS and inih
# each compile and link a tiny program with the flags make found or was given,
# or the build stops with one message naming the variable to fix.
# Usage: CC=... HDF5_FROM=... HDF5_CFLAGS=... HDF5_LIBS=... BLAS_FROM=...
#        BLAS_CFLAGS=... BLAS_LIBS=... INIH_CFLAGS=... INIH_LIBS=... check_deps.sh DIR
set -uo pipefail
dir=$1
mkdir -p "$dir"
guide='see README.md, "Building on a cluster"'

fail() {
  echo "moesim: $1 ($guide)" >&2
  echo "moesim: the compiler said (full log in $2):" >&2
  grep -m 3 -iE 'error|undefined|cannot find|not found' "$2" | sed 's/^/    /' >&2
  exit 1
}

if ! command -v "${CC%% *}" >/dev/null 2>&1; then
  echo "moesim: no MPI C compiler: '$CC' is not on PATH; load an MPI module (e.g." \
       "\`module load openmpi\`), or give make CC=/path/to/mpicc (and CXX=mpicxx for the tests);" \
       "on Debian, \`make deps\` installs Open MPI; $guide" >&2
  exit 1
fi

# How the user can correct where a dependency came from.
hdf5_fix() {
  case $HDF5_FROM in
    HDF5_DIR) echo "HDF5_DIR=${HDF5_DIR:-} does not hold a usable HDF5: set HDF5_DIR to the prefix of a parallel HDF5 (with include/hdf5.h and lib/libhdf5.so), or give HDF5_CFLAGS and HDF5_LIBS" ;;
    HDF5_LIBS) echo "HDF5_CFLAGS='$HDF5_CFLAGS' HDF5_LIBS='$HDF5_LIBS' do not give a usable HDF5: fix HDF5_CFLAGS (the -I of hdf5.h) and HDF5_LIBS (-L... -lhdf5), or give HDF5_DIR instead" ;;
    default) echo "no HDF5 found (no HDF5_DIR, no pkg-config hdf5-openmpi, hdf5_parallel, hdf5-mpi or hdf5, no parallel h5pcc on PATH): load a parallel HDF5 module (e.g. \`module load hdf5/parallel\`), or set HDF5_DIR to its prefix" ;;
    *) echo "the HDF5 from $HDF5_FROM does not compile and link: load a parallel HDF5 module, or set HDF5_DIR (or HDF5_CFLAGS and HDF5_LIBS) to override it" ;;
  esac
}
blas_fix() {
  case $BLAS_FROM in
    BLAS_LIBS) echo "BLAS_LIBS='$BLAS_LIBS' (BLAS_CFLAGS='${BLAS_CFLAGS}') does not give a usable BLAS with cblas.h: fix BLAS_LIBS (e.g. -L\$OPENBLAS_ROOT/lib -lopenblas) and BLAS_CFLAGS (the -I of cblas.h)" ;;
    default) echo "no BLAS found (no BLAS_LIBS, no pkg-config openblas or blas, no -lopenblas): load an OpenBLAS module (e.g. \`module load openblas\`), or give BLAS_LIBS and BLAS_CFLAGS" ;;
    *) echo "the BLAS from $BLAS_FROM does not compile and link: load an OpenBLAS module, or give BLAS_LIBS and BLAS_CFLAGS to override it" ;;
  esac
}

cat > "$dir/hdf5.c" <<'C'
#include <hdf5.h>
int main(void) {
    unsigned major, minor, release;
    return H5get_libversion(&major, &minor, &release) < 0;
}
C
# shellcheck disable=SC2086
$CC $HDF5_CFLAGS "$dir/hdf5.c" -o "$dir/hdf5" $HDF5_LIBS >"$dir/hdf5.log" 2>&1 ||
  fail "$(hdf5_fix)" "$dir/hdf5.log"

cat > "$dir/blas.c" <<'C'
#include <cblas.h>
int main(void) {
    float x[2] = {1, 2};
    return cblas_sdot(2, x, 1, x, 1) != 5.0f;
}
C
# shellcheck disable=SC2086
$CC $BLAS_CFLAGS "$dir/blas.c" -o "$dir/blas" $BLAS_LIBS >"$dir/blas.log" 2>&1 ||
  fail "$(blas_fix)" "$dir/blas.log"

cat > "$dir/inih.c" <<'C'
#include <ini.h>
int main(void) { return ini_parse_string("", 0, 0) != 0; }
C
# shellcheck disable=SC2086
$CC $INIH_CFLAGS "$dir/inih.c" -o "$dir/inih" $INIH_LIBS >"$dir/inih.log" 2>&1 ||
  fail "inih (the INI parser) does not compile and link with INIH_CFLAGS='$INIH_CFLAGS' INIH_LIBS='$INIH_LIBS': install it (Debian: libinih-dev; or build github.com/benhoyt/inih) and give INIH_CFLAGS and INIH_LIBS" "$dir/inih.log"
exit 0
