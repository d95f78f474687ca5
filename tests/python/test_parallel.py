"""End-to-end tests of expert parallelism (--expert-model-parallel-size) under mpirun.

Rank r trains on micro-batch r of each global batch, so a P-rank run with
micro-batch B and a 1-rank run with micro-batch P*B (same --moe-group-size) see
the same tokens in the same routing groups: routing, losses and final
parameters must match exactly (np.array_equal; issue 12, and test_layout.py
for the full matrix of layouts). Beyond that: runs
are deterministic, each rank holds only its share of the experts, dispatch
traffic stays inside an EP group and matches the kept assignments, per-phase
timing is recorded, bad layouts are refused cleanly, and a record-write
failure seen by rank 0 alone stops every rank.

Every run goes through moesim_run with a timeout, so no test can hang.
"""
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from moesim_run import BUILD, clean_env, final_checkpoint, run_moesim, run_mpi, tmpfs

SEQ = 16
TOPK = 2
EXPERTS = 4
HIDDEN = 32
GROUP = 32
STEPS = 30
B = 2  # sequences per rank in the parallel runs

SMALL = {
    "num-layers": 2, "hidden-size": HIDDEN, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": EXPERTS, "moe-router-topk": TOPK, "moe-ffn-hidden-size": 32,
    "ffn-hidden-size": 64, "train-iters": STEPS, "eval-interval": STEPS, "eval-iters": 1,
    "progress-interval": 100, "data-format": "synthetic", "synthetic-tokens": 20000,
    "moe-group-size": GROUP, "lr-warmup-iters": 5,
}

LAYOUTS = [(2, 2), (2, 1), (4, 4), (4, 2)]  # (world size, expert-parallel size)
LAYOUT_IDS = [f"world{w}-ep{e}" for w, e in LAYOUTS]

RUN_TIMEOUT = 120

EXPERT_TENSOR = re.compile(r"^layers\.(\d+)\.experts\.(fc1_w|fc2_w)$")
PHASES = ["attention", "router", "dispatch", "experts", "combine", "grad_allreduce",
          "optimizer", "other"]
SERIES = ["train/loss", "train/aux_loss", "train/z_loss", "routing/tokens_per_expert",
          "routing/dropped_per_expert"]


def load_record(path):
    with h5py.File(path, "r") as f:
        data = {name: f[name][()] for name in SERIES}
        data["traffic/dispatch_bytes"] = f["traffic/dispatch_bytes"][()]
        data["train/grad_norm"] = f["train/grad_norm"][()]
        data["timing"] = {p: f[f"timing/{p}"][()] for p in PHASES}
        data["attrs"] = dict(f.attrs)
    return data


def load_params(save_dir):
    with h5py.File(final_checkpoint(save_dir), "r") as f:
        return {name: ds[()] for name, ds in f["params"].items()}


class Runs:
    """Runs each configuration once per module; tests share the results."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache = {}

    def _finish(self, key, result, out, save):
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{key} failed (status {result.returncode}):\n{output}"
        run = {"record": load_record(out), "params": load_params(save), "stdout": result.stdout}
        assert run["record"]["attrs"]["status"] == "complete", key
        self.cache[key] = run
        return run

    def reference(self, world, **extra):
        """1 rank, micro-batch world*B: the same global batch as `world` ranks of B."""
        key = ("reference", world, tuple(sorted(extra.items())))
        if key not in self.cache:
            d = self.tmp.mktemp(f"ref{world}")
            out, save = d / "run.h5", d / "checkpoints"
            result = run_moesim("train", {**SMALL, **extra, "micro-batch-size": world * B,
                                          "out": out, "save": save}, timeout=RUN_TIMEOUT)
            self._finish(key, result, out, save)
        return self.cache[key]

    def parallel(self, world, ep, repeat=0, **extra):
        key = ("parallel", world, ep, repeat, tuple(sorted(extra.items())))
        if key not in self.cache:
            d = self.tmp.mktemp(f"w{world}ep{ep}r{repeat}")
            out, save = d / "run.h5", d / "checkpoints"
            result = run_mpi(world, "train", {**SMALL, **extra, "micro-batch-size": B,
                                              "expert-model-parallel-size": ep, "out": out,
                                              "save": save}, timeout=RUN_TIMEOUT)
            self._finish(key, result, out, save)
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


def first_routing_difference(a, b):
    """(step, layer) of the first routing row that differs, or None."""
    rows = np.argwhere((a != b).any(axis=2))
    return tuple(int(x) for x in rows[0]) if len(rows) else None


def assert_series_equal(name, got, want, what):
    """Exactly equal, or the first differing step (row + 1) with both values."""
    assert got.shape == want.shape, f"{what}: {name} shape {got.shape} vs 1-rank {want.shape}"
    if not np.array_equal(got, want):
        row = int(np.argwhere(got != want)[0][0])
        raise AssertionError(f"{what}: {name} differs from the 1-rank run first at step "
                             f"{row + 1}: {got[row]!r} vs {want[row]!r}")


# ---- 1. equivalence with the 1-rank run --------------------------------------------

@pytest.mark.parametrize("world,ep", LAYOUTS, ids=LAYOUT_IDS)
def test_parallel_run_matches_one_rank_run(runs, world, ep):
    ref = runs.reference(world)
    par = runs.parallel(world, ep)
    rec, ref_rec = par["record"], ref["record"]
    assert rec["attrs"]["world_size"] == world
    assert rec["attrs"]["ep_size"] == ep
    assert ref_rec["attrs"]["world_size"] == 1

    for name in ("routing/tokens_per_expert", "routing/dropped_per_expert"):
        got, want = rec[name], ref_rec[name]
        assert got.shape == want.shape == (STEPS, 2, EXPERTS), name
        where = first_routing_difference(got, want)
        assert where is None, (
            f"{name} differs from the 1-rank run first at step {where[0] + 1} (row {where[0]}), "
            f"MoE layer {where[1]}: world {world} EP {ep} gives {got[where].tolist()}, "
            f"1 rank gives {want[where].tolist()}")

    # every token of the global batch is routed to TOPK experts in every layer
    assignments = rec["routing/tokens_per_expert"].sum(axis=2)
    assert (assignments == TOPK * world * B * SEQ).all(), assignments

    assert rec["train/loss"].shape == (STEPS,)
    assert_series_equal("train/loss", rec["train/loss"], ref_rec["train/loss"],
                        f"world {world} EP {ep}")

    params, ref_params = par["params"], ref["params"]
    assert params.keys() == ref_params.keys()
    for name, want in ref_params.items():
        got = params[name]
        assert got.shape == want.shape, f"{name}: {got.shape} vs 1-rank {want.shape}"
        if not np.array_equal(got, want):
            index = tuple(int(i) for i in np.argwhere(got != want)[0])
            raise AssertionError(
                f"final parameter {name} differs from the 1-rank run first at {index}: "
                f"{got[index]!r} vs {want[index]!r} "
                f"({np.count_nonzero(got != want)} of {got.size} elements)")


# bf16 (--precision bf16) rounds matmul inputs elementwise and changes no call
# shape, so each step's forward and backward match the 1-rank run exactly, as
# float32's do, on either bf16 GEMM (--bf16-gemm auto: oneDNN's where the CPU
# has bf16 instructions; its result for a row depends on the call's shape
# alone, like sgemm's). The model is 128 wide so that its linear layers and
# experts are large enough for oneDNN (BF16_GEMM_MIN_MACS), while attention's
# products stay emulated: both paths run. The weights are frozen (lr 1e-30:
# every AdamW step is far below an ulp of every weight) as they were when the
# layouts' float32 master weights differed by an ulp, which a bf16 rounding
# boundary amplified to 2^-8: this test isolates bf16's steps over 30
# different batches (routing, losses and gradient norms all exact);
# test_layout.py checks trained trajectories.
FROZEN_WIDE = {"lr": 1e-30, "min-lr": 0, "hidden-size": 128, "ffn-hidden-size": 128,
               "moe-ffn-hidden-size": 128}
FROZEN_BF16 = {"precision": "bf16", **FROZEN_WIDE}


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)], ids=["world2-ep2", "world4-ep2"])
def test_bf16_steps_match_one_rank_run(runs, world, ep):
    ref = runs.reference(world, **FROZEN_BF16)["record"]
    par = runs.parallel(world, ep, **FROZEN_BF16)
    rec = par["record"]
    assert rec["attrs"]["config.precision"] == ref["attrs"]["config.precision"] == "bf16"
    assert rec["attrs"]["bf16_gemm"] == ref["attrs"]["bf16_gemm"] != "none"
    for name in ("routing/tokens_per_expert", "routing/dropped_per_expert"):
        where = first_routing_difference(rec[name], ref[name])
        assert where is None, f"{name} differs from the 1-rank run first at step {where[0] + 1}"
    for name in ("train/loss", "train/grad_norm"):
        assert rec[name].shape == (STEPS,), name
        assert_series_equal(name, rec[name], ref[name], f"bf16 world {world} EP {ep}")
    assert len(np.unique(rec["train/loss"])) == STEPS, "every step must see a new batch"
    fp32 = runs.reference(world, **FROZEN_WIDE)["record"]["train/loss"]
    assert not np.array_equal(ref["train/loss"][:1], fp32[:1]), "bf16 computed in float32"


# ---- 2. determinism -------------------------------------------------------------------

def test_same_layout_twice_is_bit_identical(runs):
    first, second = runs.parallel(2, 2), runs.parallel(2, 2, repeat=1)
    for name in SERIES:
        a, b = first["record"][name], second["record"][name]
        assert a.shape == b.shape, name
        assert np.array_equal(a, b), (
            f"{name} differs between two identical runs, first at row "
            f"{int(np.argwhere(a != b)[0][0])}")
    assert first["params"].keys() == second["params"].keys()
    for name, a in first["params"].items():
        b = second["params"][name]
        assert a.tobytes() == b.tobytes(), f"saved parameter {name} differs between two runs"


# ---- 3. each rank holds only its experts ---------------------------------------------

def parameter_counts(params):
    """(dense parameters, per-expert parameters summed over MoE layers, experts, MoE layers)
    from a saved parameter file (experts in global order)."""
    dense = expert_per_expert = 0
    moe_layers, experts = set(), set()
    for name, array in params.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            moe_layers.add(int(m.group(1)))
            experts.add(array.shape[0])
            expert_per_expert += array.size // array.shape[0]
        else:
            dense += array.size
    assert len(experts) == 1, f"expert tensors disagree on the number of experts: {experts}"
    return dense, expert_per_expert, experts.pop(), len(moe_layers)


@pytest.mark.parametrize("world,ep", [(2, 2), (2, 1), (4, 2)],
                         ids=["world2-ep2", "world2-ep1", "world4-ep2"])
def test_each_rank_holds_only_its_experts(runs, world, ep):
    dense, per_expert, experts, moe_layers = parameter_counts(runs.reference(world)["params"])
    assert experts == EXPERTS and moe_layers == 2
    par = runs.parallel(world, ep)
    attrs = par["record"]["attrs"]
    want = 4 * (dense + experts // ep * per_expert)
    assert list(attrs["param_bytes_per_rank"]) == [want] * world, (
        f"param_bytes_per_rank {list(attrs['param_bytes_per_rank'])}, expected {want} each "
        f"({dense} dense + {experts // ep} of {experts} experts x {per_expert} params)")
    assert attrs["params_total"] == dense + experts * per_expert
    assert attrs["params_total"] == sum(a.size for a in par["params"].values())
    # per_expert sums one expert's parameters over the MoE layers; top-2 routing
    assert attrs["params_active_per_token"] == dense + 2 * per_expert
    header = [line for line in par["stdout"].splitlines()
              if line.startswith("parameters per rank:")]
    assert len(header) == 1, par["stdout"]
    assert f"{experts // ep} of {experts} experts" in header[0], header[0]


# ---- 4. dispatch traffic --------------------------------------------------------------

@pytest.mark.parametrize("world,ep", LAYOUTS, ids=LAYOUT_IDS)
def test_dispatch_traffic_stays_in_ep_group_and_matches_kept_rows(runs, world, ep):
    rec = runs.parallel(world, ep)["record"]
    traffic = rec["traffic/dispatch_bytes"]
    assert traffic.shape == (STEPS, world, world)
    assert (traffic >= 0).all()
    group = np.arange(world) // ep
    outside = group[:, None] != group[None, :]
    assert not traffic[:, outside].any(), (
        f"bytes sent between ranks of different EP groups (EP {ep}): "
        f"{np.argwhere(traffic * outside)[:5].tolist()}")
    kept = (rec["routing/tokens_per_expert"] - rec["routing/dropped_per_expert"]).sum(axis=(1, 2))
    assert np.array_equal(traffic.sum(axis=(1, 2)), kept * HIDDEN * 4), (
        traffic.sum(axis=(1, 2)), kept * HIDDEN * 4)
    if ep > 1:  # tokens really cross ranks
        assert traffic[:, ~outside & ~np.eye(world, dtype=bool)].sum() > 0


# ---- 5. phase timing ------------------------------------------------------------------

@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)], ids=["world2-ep2", "world4-ep2"])
def test_phase_timing_recorded_per_rank(runs, world, ep):
    timing = runs.parallel(world, ep)["record"]["timing"]
    assert sorted(timing) == sorted(PHASES)
    for phase, t in timing.items():
        assert t.shape == (STEPS, world), phase
        assert np.isfinite(t).all() and (t >= 0).all(), phase
    total = sum(timing.values())
    assert (total > 0).all(), f"a step with no time on some rank: {np.argwhere(total <= 0)}"
    assert timing["dispatch"].sum() > 0 and timing["combine"].sum() > 0


# ---- 6. bad layouts ---------------------------------------------------------------------

BAD_LAYOUTS = {
    "ep-does-not-divide-world": (2, {"expert-model-parallel-size": 3},
                                 ["--expert-model-parallel-size 3"]),
    "experts-not-divisible-by-ep": (2, {"num-experts": 3, "expert-model-parallel-size": 2},
                                    ["--num-experts 3", "--expert-model-parallel-size 2"]),
    "more-ep-ranks-than-experts": (4, {"num-experts": 2, "moe-router-topk": 1,
                                       "expert-model-parallel-size": 4},
                                   ["--expert-model-parallel-size 4", "--num-experts 2"]),
    # The EP size nobody typed: --expert-model-parallel-size 0 takes the rank
    # count, and the message says so and names a size that fits.
    "three-ranks-for-eight-experts": (3, {"num-experts": 8},
                                      ["taken from the rank count", "3 ranks",
                                       "--num-experts 8", "--expert-model-parallel-size 1"]),
    "more-ranks-than-experts": (4, {"num-experts": 2, "moe-router-topk": 1},
                                ["taken from the rank count", "4 ranks", "--num-experts 2",
                                 "--expert-model-parallel-size 2"]),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layout_is_refused_with_one_error(tmp_path, case):
    world, extra, must_name = BAD_LAYOUTS[case]
    out = tmp_path / "bad.h5"
    result = run_mpi(world, "train", {**SMALL, "micro-batch-size": B, **extra, "out": out},
                     timeout=RUN_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in output.splitlines() if "moesim: error:" in line]
    assert len(errors) == 1, output
    for text in must_name:
        assert text in errors[0], errors[0]
    assert not out.exists()


# ---- 7. a fault only rank 0 sees -------------------------------------------------------

FAULT_TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_tmpfs(tmp_path_factory):
    """A 3000 KiB tmpfs: the run record fits it for its first 1024 rows, and its
    first flush past them does not (test_disk_full.py has the details)."""
    with tmpfs(tmp_path_factory.mktemp("tiny") / "disk", "3000k") as mnt:
        yield mnt


@pytest.fixture(scope="module")
def record_fault(tiny_tmpfs):
    """One long world-2 run whose record (written by rank 0 only) fills the tmpfs."""
    out = tiny_tmpfs / "run.h5"
    options = {**SMALL, "micro-batch-size": B, "train-iters": 100000, "eval-interval": 100000,
               "log-interval": 1, "progress-interval": 10, "out": out}
    start = time.monotonic()
    try:
        result = run_mpi(2, "train", options, timeout=FAULT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not stop within {FAULT_TIMEOUT}s after the record filled "
                    f"its disk: a rank hangs")
    elapsed = time.monotonic() - start
    status = None
    rows = None
    try:
        with h5py.File(out, "r") as f:
            status = f.attrs.get("status")
            rows = f["train/loss"].shape[0] if "train/loss" in f else None
    except OSError as e:
        status = f"unreadable ({e})"
    return {"result": result, "elapsed": elapsed, "out": out, "status": status,
            "rows": rows, "output": result.stdout + result.stderr}


def test_record_write_failure_on_rank0_stops_every_rank(record_fault):
    fault = record_fault
    output = fault["output"]
    progress = re.findall(r"^step\s+(\d+)/", fault["result"].stdout, re.M)
    print(f"record fault: status {fault['result'].returncode} after {fault['elapsed']:.1f}s, "
          f"last progress step {progress[-1] if progress else None}, "
          f"record status {fault['status']!r}, {fault['rows']} train rows readable")
    assert fault["result"].returncode != 0, output
    assert fault["elapsed"] < 60, f"took {fault['elapsed']:.0f}s to stop"
    errors = [line for line in output.splitlines() if "moesim: error:" in line]
    assert len(errors) == 1, output
    assert str(fault["out"]) in errors[0], errors[0]
    assert progress, output  # it failed mid-run, not at the start
    assert fault["status"] == "failed"


def test_record_write_failure_exits_cleanly(record_fault):
    """Status 1 from every rank, no crash at shutdown. HDF5 1.10.8 cannot close a
    file whose flush hit a full disk and used to segfault in MPI_Finalize on it;
    record_library_open keeps HDF5 out of MPI_Finalize, and a flush that would
    not fit is no longer tried: the record, whole, says 'failed'."""
    result = record_fault["result"]
    output = record_fault["output"]
    assert "Segmentation fault" not in output and "exited on signal" not in output, output
    assert result.returncode == 1, output
    assert record_fault["status"] == "failed", record_fault["status"]


def test_info_summarises_the_record_only_if_it_reads_back(record_fault):
    """What the full disk left behind reads back whole, so `moesim info`
    summarises it (a file h5py could not read whole it would call corrupt)."""
    out = record_fault["out"]
    try:
        with h5py.File(out, "r") as f:
            dict(f.attrs)
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        readable = True
    except (OSError, KeyError, RuntimeError, ValueError):
        readable = False
    info = subprocess.run([str(BUILD / "moesim"), "info", str(out)], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    print(f"record fault: h5py reads it all: {readable}; moesim info: {info.returncode}")
    assert readable
    assert info.returncode == 0, info.stderr
    assert "status failed" in info.stdout, info.stdout


# ---- every router keeps the 1-rank equivalence ----------------------------------------

ROUTER_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "routers")
                        .glob("*.ini"))
ROUTER_STEPS = 12
ROUTER_SERIES = ["train/loss", "train/aux_loss", "train/z_loss", "train/importance_loss",
                 "train/load_loss", "routing/tokens_per_expert", "routing/dropped_per_expert",
                 "routing/expert_bias"]


def router_run(tmp_path, config, world, micro_batch):
    out = tmp_path / f"{config.stem}-w{world}.h5"
    options = {"config": config, **SMALL, "train-iters": ROUTER_STEPS,
               "eval-interval": ROUTER_STEPS, "micro-batch-size": micro_batch, "out": out}
    # the shared expert of a config is sized for the default model; keep it small here
    if "shared-expert" in config.read_text():
        options["moe-shared-expert-intermediate-size"] = 16
    result = run_mpi(world, "train", options, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["config.moe_router_type"] in config.read_text()
        return {name: f[name][()] for name in ROUTER_SERIES}


@pytest.mark.parametrize("config", ROUTER_CONFIGS, ids=[c.stem for c in ROUTER_CONFIGS])
def test_every_router_matches_the_one_rank_run(tmp_path, config):
    one = router_run(tmp_path, config, 1, 2 * B)
    two = router_run(tmp_path, config, 2, B)
    # the expert bias follows the integer loads, so it too must match exactly
    for name in ("routing/tokens_per_expert", "routing/dropped_per_expert", "routing/expert_bias"):
        differs = np.flatnonzero((one[name] != two[name]).reshape(ROUTER_STEPS, -1).any(1))
        assert len(differs) == 0, f"{config.stem}: {name} differs first at step {differs[0] + 1}"
    for name in ("train/loss", "train/aux_loss", "train/z_loss", "train/importance_loss",
                 "train/load_loss"):
        assert_series_equal(name, two[name], one[name], config.stem)
