# moesim — build, run, test, bench. On a fresh Debian 12 machine `make run`
# and `make test` are the only two commands: both install what is missing.

# On a cluster without root: load MPI, parallel HDF5 and OpenBLAS modules and
# run `make`; see README, "Building on a cluster", for the variables below.

CC       := mpicc
CXX      := mpicxx
PYTHON   := /usr/bin/python3
BUILD    := build

# Plain `make` builds the binary (the variant rules below would otherwise make
# the library the default goal).
.DEFAULT_GOAL := all

# ---- Dependencies, found in the environment; every one can be given instead.
# pkg-config only answers once `make deps` (or a module) has provided them.
pkg_first = $(firstword $(foreach pkg,$(1),$(shell pkg-config --exists $(pkg) 2>/dev/null && echo $(pkg))))

# Parallel HDF5: HDF5_CFLAGS/HDF5_LIBS as given; else HDF5_DIR (the prefix of
# an installation: include/, lib/ or lib64/); else the first of HDF5_PKGS that
# pkg-config knows; else h5pcc on PATH when `h5pcc -showconfig` says parallel.
HDF5_PKGS := hdf5-openmpi hdf5_parallel hdf5-mpi hdf5
ifneq ($(strip $(HDF5_LIBS)),)
  HDF5_FROM := HDF5_LIBS
else ifneq ($(strip $(HDF5_DIR)),)
  HDF5_LIBDIR := $(if $(wildcard $(HDF5_DIR)/lib64/libhdf5.*),$(HDF5_DIR)/lib64,$(HDF5_DIR)/lib)
  HDF5_CFLAGS := -I$(HDF5_DIR)/include
  HDF5_LIBS   := -L$(HDF5_LIBDIR) -Wl,-rpath,$(HDF5_LIBDIR) -lhdf5
  HDF5_FROM   := HDF5_DIR
else
  HDF5_PKG := $(call pkg_first,$(HDF5_PKGS))
  ifneq ($(HDF5_PKG),)
    HDF5_CFLAGS := $(shell pkg-config --cflags $(HDF5_PKG))
    HDF5_LIBS   := $(shell pkg-config --libs $(HDF5_PKG))
    HDF5_FROM   := pkg-config $(HDF5_PKG)
  else ifneq ($(shell h5pcc -showconfig 2>/dev/null | grep -i 'parallel hdf5: *yes'),)
    H5PCC_SHOW  := $(shell h5pcc -show 2>/dev/null)
    HDF5_CFLAGS := $(filter -I%,$(H5PCC_SHOW))
    HDF5_LIBS   := $(foreach dir,$(patsubst -L%,%,$(filter -L%,$(H5PCC_SHOW))),-L$(dir) -Wl,-rpath,$(dir)) -lhdf5
    HDF5_FROM   := h5pcc
  else
    HDF5_LIBS := -lhdf5
    HDF5_FROM := default
  endif
endif

# BLAS with cblas.h (OpenBLAS: moesim asks it for its kernel): BLAS_CFLAGS/
# BLAS_LIBS as given; else the first of BLAS_PKGS that pkg-config knows.
BLAS_PKGS := openblas blas
ifneq ($(strip $(BLAS_LIBS)),)
  BLAS_FROM := BLAS_LIBS
else
  BLAS_PKG := $(call pkg_first,$(BLAS_PKGS))
  ifneq ($(BLAS_PKG),)
    BLAS_CFLAGS := $(shell pkg-config --cflags $(BLAS_PKG))
    BLAS_LIBS   := $(shell pkg-config --libs $(BLAS_PKG))
    BLAS_FROM   := pkg-config $(BLAS_PKG)
  else
    BLAS_LIBS := -lopenblas
    BLAS_FROM := default
  endif
endif

# inih (INI parsing): INIH_CFLAGS/INIH_LIBS, else pkg-config inih, else -linih.
ifeq ($(strip $(INIH_LIBS)),)
  INIH_CFLAGS := $(shell pkg-config --cflags inih 2>/dev/null)
  INIH_LIBS   := $(or $(shell pkg-config --libs inih 2>/dev/null),-linih)
endif

# oneDNN (Debian: libdnnl-dev), optional: the native bf16 GEMM (--bf16-gemm).
# ONEDNN=1 uses it, ONEDNN=0 builds the bf16 emulation only; by default it is
# used when its header compiles. It runs on OpenMP (libgomp), which moesim
# limits to one thread per rank.
ONEDNN_LIBS ?= -ldnnl -lgomp
ifeq ($(origin ONEDNN),undefined)
  ONEDNN := $(if $(shell printf '\#include <oneapi/dnnl/dnnl.h>\n' | $(CC) $(ONEDNN_CFLAGS) -E -x c - \
	>/dev/null 2>&1 && echo yes),1,0)
endif
ifeq ($(ONEDNN),1)
  ONEDNN_FLAGS := -DMOESIM_HAVE_ONEDNN $(ONEDNN_CFLAGS)
  ONEDNN_LINK  := $(ONEDNN_LIBS)
endif

PKG_CFLAGS = $(HDF5_CFLAGS) $(BLAS_CFLAGS) $(INIH_CFLAGS) $(ONEDNN_FLAGS)
PKG_LIBS   = $(HDF5_LIBS) $(BLAS_LIBS) $(INIH_LIBS) $(ONEDNN_LINK) -lm
WARN     := -Wall -Wextra -Werror
# AVX2, not -march=native: GCC 12 with AVX-512 (-march=native on these Zen
# machines, or x86-64-v4) miscompiles `std::vector<int>{1,1,1,1,0,0,0,0}` into
# all ones at -O2. The matmuls are OpenBLAS's own kernels either way.
OPT      ?= -O2 -march=x86-64-v3
CFLAGS    = -std=c11 -D_GNU_SOURCE $(OPT) -g $(WARN) -Iinclude $(PKG_CFLAGS) $(SAN)
CXXFLAGS  = -std=c++17 -DOMPI_SKIP_MPICXX=1 $(OPT) -g $(WARN) -Iinclude $(PKG_CFLAGS) $(SAN)
LDLIBS    = $(PKG_LIBS)

GIT_REVISION := $(shell git describe --always --dirty 2>/dev/null || echo unknown)

LIB_SRC  := $(filter-out src/main.c,$(wildcard src/*.c))
TEST_SRC := $(filter-out tests/test_cli.cpp,$(wildcard tests/*.cpp))

# One build tree per variant: the sanitizer build lives beside the normal one.
define variant
$(1)_OBJ  := $$(patsubst src/%.c,$(2)/obj/%.o,$$(LIB_SRC))
$(1)_TOBJ := $$(patsubst tests/%.cpp,$(2)/obj/tests/%.o,$$(TEST_SRC))
$(2)/obj/%.o: src/%.c $$(wildcard include/moesim/*.h) | $(2)/obj $(DEPS_CHECK)
	$$(CC) $$(CFLAGS) -c $$< -o $$@
$(2)/obj/tests/%.o: tests/%.cpp $$(wildcard include/moesim/*.h) $$(wildcard tests/*.h) | $(2)/obj/tests $(DEPS_CHECK)
	$$(CXX) $$(CXXFLAGS) -c $$< -o $$@
$(2)/libmoesim.a: $$($(1)_OBJ)
	ar rcs $$@ $$^
$(2)/moesim: $(2)/obj/main.o $(2)/libmoesim.a
	$$(CC) $$(CFLAGS) $$^ -o $$@ $$(LDLIBS)
$(2)/unit_tests: $$($(1)_TOBJ) $(2)/libmoesim.a
	$$(CXX) $$(CXXFLAGS) $$^ -o $$@ $$(LDLIBS) $$(shell pkg-config --libs gtest)
$(2)/cli_tests: $(2)/obj/tests/test_cli.o
	$$(CXX) $$(CXXFLAGS) $$^ -o $$@ $$(shell pkg-config --libs gtest) -lgtest_main
$(2)/export_reference: tests/reference/export_reference.c $(2)/libmoesim.a | $(2)/obj
	$$(CC) $$(CFLAGS) $$^ -o $$@ $$(LDLIBS)
# The record names the build's git revision; record.o is rebuilt when it changes.
$(2)/obj/record.o: $(2)/revision
$(2)/obj/record.o: CFLAGS += -DMOESIM_GIT_REVISION='"$$(GIT_REVISION)"'
$(2)/revision: FORCE | $(2)/obj
	@echo '$$(GIT_REVISION)' | cmp -s - $$@ || echo '$$(GIT_REVISION)' > $$@
# bf16_gemm.o is rebuilt when ONEDNN changes.
$(2)/obj/bf16_gemm.o: $(2)/onednn
$(2)/onednn: FORCE | $(2)/obj
	@echo '$$(ONEDNN)' | cmp -s - $$@ || echo '$$(ONEDNN)' > $$@
$(2)/obj $(2)/obj/tests:
	mkdir -p $$@
endef

# Before compiling anything: mpicc, HDF5, BLAS and inih compile and link, or
# one message names the variable to fix. Checked again when a setting changes.
DEPS_CHECK := $(BUILD)/deps/ok
DEPS_SETTINGS = CC=$(CC) HDF5_FROM=$(HDF5_FROM) HDF5_CFLAGS=$(HDF5_CFLAGS) HDF5_LIBS=$(HDF5_LIBS) \
	BLAS_FROM=$(BLAS_FROM) BLAS_CFLAGS=$(BLAS_CFLAGS) BLAS_LIBS=$(BLAS_LIBS) \
	INIH_CFLAGS=$(INIH_CFLAGS) INIH_LIBS=$(INIH_LIBS)
$(BUILD)/deps/settings: FORCE
	@mkdir -p $(@D)
	@echo '$(DEPS_SETTINGS)' | cmp -s - $@ || echo '$(DEPS_SETTINGS)' > $@
$(DEPS_CHECK): $(BUILD)/deps/settings tools/check_deps.sh
	@CC='$(CC)' HDF5_FROM='$(HDF5_FROM)' HDF5_DIR='$(HDF5_DIR)' HDF5_CFLAGS='$(HDF5_CFLAGS)' \
		HDF5_LIBS='$(HDF5_LIBS)' BLAS_FROM='$(BLAS_FROM)' BLAS_CFLAGS='$(BLAS_CFLAGS)' \
		BLAS_LIBS='$(BLAS_LIBS)' INIH_CFLAGS='$(INIH_CFLAGS)' INIH_LIBS='$(INIH_LIBS)' \
		bash tools/check_deps.sh $(@D)
	@touch $@

$(eval $(call variant,REL,$(BUILD)))
$(eval $(call variant,SAN,$(BUILD)/sanitize))

$(BUILD)/sanitize/%: SAN = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
$(BUILD)/sanitize/%: OPT = -O1

MPIRUN := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 \
          mpirun --oversubscribe
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0 \
           LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: all deps run test unit cli pytest sanitize bench sweep validate-projection test-slurm cf-sweep \
        precision-study switch-study scaling specialization test-multinode bench-multinode clean FORCE
all: $(BUILD)/moesim

deps:
	@bash tools/deps.sh

run: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	@mkdir -p runs
	$(MPIRUN) -n 2 $(BUILD)/moesim train --config experiments/default.ini --out runs/default.h5 \
		--overwrite 1

test: deps
	@$(MAKE) --no-print-directory unit cli pytest sanitize test-multinode

# Every test on one rank, then the expert-parallel tests across two.
unit: $(BUILD)/unit_tests $(BUILD)/moesim
	$(MPIRUN) -n 1 $(BUILD)/unit_tests
	$(MPIRUN) -n 2 $(BUILD)/unit_tests --gtest_filter='Distributed*'

cli: $(BUILD)/cli_tests $(BUILD)/moesim
	MOESIM=$(CURDIR)/$(BUILD)/moesim $(BUILD)/cli_tests

# The PyTorch reference, the learning check and other end-to-end runs.
pytest: $(BUILD)/export_reference $(BUILD)/moesim
	OPENBLAS_NUM_THREADS=1 MOESIM_BUILD=$(CURDIR)/$(BUILD) $(PYTHON) -m pytest -q -p no:cacheprovider tests/python

SAN_RUN_FLAGS := --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 32 \
	--micro-batch-size 4 --num-experts 4 --moe-ffn-hidden-size 32 --ffn-hidden-size 64 \
	--moe-layer-freq 2 --moe-group-size 32 --train-iters 6 --eval-interval 3 --eval-iters 2 \
	--progress-interval 3
sanitize: $(BUILD)/sanitize/unit_tests $(BUILD)/sanitize/moesim
	$(SAN_ENV) $(MPIRUN) -n 1 $(BUILD)/sanitize/unit_tests
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/unit_tests --gtest_filter='Distributed*'
	mkdir -p $(BUILD)/sanitize/runs
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/moesim train $(SAN_RUN_FLAGS) \
		--out $(BUILD)/sanitize/runs/train.h5 --overwrite 1
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/moesim train $(SAN_RUN_FLAGS) \
		--moe-expert-shadowing 1 --moe-shadow-min-rows 1 --moe-expert-dropout 0.1 \
		--out $(BUILD)/sanitize/runs/shadow.h5 --overwrite 1 > $(BUILD)/sanitize/runs/shadow.log \
		|| { cat $(BUILD)/sanitize/runs/shadow.log; false; }
	grep 'shadowing: ' $(BUILD)/sanitize/runs/shadow.log
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/moesim train $(SAN_RUN_FLAGS) \
		--overlap-grad-reduce 1 --moe-overlap-chunks 2 \
		--out $(BUILD)/sanitize/runs/overlap.h5 --overwrite 1
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/moesim train $(SAN_RUN_FLAGS) --precision bf16 \
		--hidden-size 128 --ffn-hidden-size 128 --moe-ffn-hidden-size 128 \
		--out $(BUILD)/sanitize/runs/bf16.h5 --overwrite 1
	$(SAN_ENV) $(BUILD)/sanitize/moesim project $(BUILD)/sanitize/runs/train.h5 \
		--cluster experiments/clusters/h100_nvlink_ib400.ini --world-size 4 \
		--moe-token-dispatcher-type hierarchical --ranks-per-node 2 \
		--out $(BUILD)/sanitize/runs/projection.h5
	$(SAN_ENV) $(MPIRUN) -n 2 $(BUILD)/sanitize/moesim calibrate $(SAN_RUN_FLAGS) \
		--out $(BUILD)/sanitize/runs/here.ini
	$(SAN_ENV) $(BUILD)/sanitize/moesim project $(BUILD)/sanitize/runs/train.h5 \
		--cluster $(BUILD)/sanitize/runs/here.ini --world-size 2 \
		--out $(BUILD)/sanitize/runs/projection-here.h5

# One rank: MFU. Two ranks (one per core): MFU, exchange cost over a raw
# MPI_Alltoallv, weak scaling against rank 0 alone, memory against analytic.
# Then moesim's tokens/s against an eager PyTorch peer of the same model
# (experiments/torch_peer.py) on the bench and the small config, alternating
# the two in one run.
bench: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	@mkdir -p runs
	$(MPIRUN) -n 1 $(BUILD)/moesim bench --config experiments/bench.ini
	$(MPIRUN) -n 2 $(BUILD)/moesim bench --config experiments/bench.ini
	$(PYTHON) experiments/bench_peer --moesim $(BUILD)/moesim

# `moesim project` against real runs: calibrate here on small.ini, train small,
# bench and tiny (the last two held out) on 1 and 2 ranks over shared memory,
# predict each run's step and phase times, print the table; fails above 15%
# median error on the step time. The emulated two-node cluster (after
# tests/multinode/cluster.sh up): VALIDATE_FLAGS='--launcher "bash
# tests/multinode/cluster_mpirun.sh --map-by node" --worlds 2 --ranks-per-node 1
# --network-from experiments/clusters/emulated_two_node.ini'.
validate-projection: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) tools/validate_projection.py $(VALIDATE_FLAGS)

# A sweep of trainings from a spec: make sweep SPEC=experiments/sweeps/two_point.ini [OUT=dir]
SPEC ?= experiments/sweeps/two_point.ini
sweep: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/sweep $(SPEC) $(if $(OUT),--out $(OUT))

# A real one-machine SLURM cluster (Debian's slurm-wlm + munge, installed if
# missing; needs root) runs experiments/slurm/run.sbatch and sweep.sbatch.
test-slurm: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	bash tests/slurm/test_slurm.sh

# An emulated 2-node cluster on this machine (network namespaces, veth, a
# bridge, tbf-shaped links; needs root): 4 ranks across the nodes against 1
# rank, TCP between nodes and vader within, a killed rank ending the job.
test-multinode: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	bash tests/multinode/test_multinode.sh

# The emulated 2-node cluster at several link rates (needs root): step time
# of each dispatcher and overlap setting, exchange against a raw Alltoallv,
# inter-node bytes. RATES=100mbit,1gbit,10gbit STEPS=10 ROUNDS=1 by default.
bench-multinode: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/bench_multinode $(if $(RATES),--rates $(RATES)) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(ROUNDS),--rounds $(ROUNDS))

# Experiments: a sweep, then its notebook executed beside the records.
# Paths are absolute because nbconvert runs a notebook from its own folder.
EXECUTE_NOTEBOOK := PYDEVD_DISABLE_FILE_VALIDATION=1 $(PYTHON) -m jupyter nbconvert --to notebook \
	--execute --ExecutePreprocessor.timeout=600

cf-sweep: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/sweep experiments/sweeps/cf_sweep.ini --out runs/cf_sweep
	MOESIM_SWEEP=$(CURDIR)/runs/cf_sweep MOESIM_FIGURES=$(CURDIR)/runs/cf_sweep/figures \
		$(EXECUTE_NOTEBOOK) analysis/notebooks/capacity_factor.ipynb --output-dir runs/cf_sweep

# Switch top-1 vs dense at equal active FLOPs, with the recipe's ablations
# (issue 17): about 60 minutes on 2 idle cores. STEPS=N runs a copy of the
# spec shortened to N steps (evaluating every N/10) into runs/switch_study_N:
# a check of the pipeline, not the study.
SWITCH_STUDY_OUT = runs/switch_study$(if $(STEPS),_$(STEPS))
SWITCH_STUDY_SPEC = $(if $(STEPS),$(SWITCH_STUDY_OUT)/switch_study.ini,experiments/sweeps/switch_study.ini)
switch-study: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(if $(STEPS),mkdir -p $(SWITCH_STUDY_OUT) && sed -e 's/^train-iters = .*/train-iters = $(STEPS)/' \
		-e 's/^eval-interval = .*/eval-interval = $(shell expr $(STEPS) / 10)/' \
		experiments/sweeps/switch_study.ini > $(SWITCH_STUDY_SPEC))
	$(PYTHON) experiments/sweep $(SWITCH_STUDY_SPEC) --out $(SWITCH_STUDY_OUT)
	MOESIM_SWEEP=$(CURDIR)/$(SWITCH_STUDY_OUT) MOESIM_FIGURES=$(CURDIR)/$(SWITCH_STUDY_OUT)/figures \
		$(EXECUTE_NOTEBOOK) analysis/notebooks/switch_study.ipynb --output-dir $(SWITCH_STUDY_OUT)

# Selective precision on the default run (issue 11): fp32, bf16 (native GEMM
# where the CPU has one, and emulated), and the router's precision each way;
# prints validation losses and speed against fp32, about 6 minutes.
precision-study: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/sweep experiments/sweeps/precision.ini --out runs/precision
	$(PYTHON) experiments/precision_summary runs/precision

scaling: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/sweep experiments/sweeps/scaling_weak.ini --out runs/scaling/weak
	$(PYTHON) experiments/sweep experiments/sweeps/scaling_strong.ini --out runs/scaling/strong
	MOESIM_SWEEP=$(CURDIR)/runs/scaling MOESIM_FIGURES=$(CURDIR)/runs/scaling/figures \
		$(EXECUTE_NOTEBOOK) analysis/notebooks/scaling.ipynb --output-dir runs/scaling

specialization: deps
	@$(MAKE) --no-print-directory $(BUILD)/moesim
	$(PYTHON) experiments/sweep experiments/sweeps/specialization.ini --out runs/specialization
	MOESIM_SWEEP=$(CURDIR)/runs/specialization \
		MOESIM_FIGURES=$(CURDIR)/runs/specialization/figures \
		$(EXECUTE_NOTEBOOK) analysis/notebooks/specialization.ipynb --output-dir runs/specialization

clean:
	rm -rf $(BUILD)
