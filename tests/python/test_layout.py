"""The parallel layout never changes a result (issue 12).

For a fixed config and seed, the same global batch of sequences and the same
--moe-group-size, a run on P ranks with expert-parallel size EP must write
exactly the record and final parameters of the 1-rank run: every /train/
dataset except timings and tokens/s, every /eval/, /routing/ and
/specialization/ dataset, and every tensor of --save. "Exactly" is
np.array_equal, never a tolerance: a float reduction whose result depends on
how the batch is split across ranks shows up as a difference at some step.

Every run goes through moesim_run with a timeout and happens once per module.
"""
import re
import subprocess

import h5py
import numpy as np
import pytest

from moesim_run import run_moesim, run_mpi, final_checkpoint

SEQ = 16
EXPERTS = 4
TOPK = 2
STEPS = 100
GLOBAL_BATCH = 12  # sequences per step, whatever the layout
GROUP = SEQ        # one sequence per routing group, so every micro-batch holds whole groups
RUN_TIMEOUT = 120

TINY = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": EXPERTS, "moe-router-topk": TOPK, "moe-ffn-hidden-size": 32,
    "ffn-hidden-size": 64, "train-iters": STEPS, "eval-interval": 50, "eval-iters": 2,
    "log-interval": 1, "progress-interval": 1000, "data-format": "synthetic",
    "synthetic-tokens": 20000, "lr-warmup-iters": 5,
}

# Each variant is the base (capacity factor 1.0, which drops tokens) plus its flags.
BASE = {"moe-expert-capacity-factor": 1.0}
VARIANTS = {
    "dropped": {},
    "dropless": {"moe-expert-capacity-factor": 0},
    "global-aux-loss": {"moe-router-load-balancing-type": "global_aux_loss"},
    "noisy-topk": {"moe-router-type": "noisy_topk"},
    "gshard-top2": {"moe-router-type": "gshard_top2"},
    "expert-bias": {"moe-router-enable-expert-bias": 1, "moe-router-bias-update-rate": 1e-3},
    # DeepSeek-V3 group-limited routing: 2 groups of 2 experts, one group per token
    "group-limited": {"moe-router-num-groups": 2, "moe-router-group-topk": 1},
    # Shazeer 2017 hierarchical MoE: a primary router picks 1 of 2 groups of 2 experts
    "hier-moe": {"moe-hierarchical-groups": 2, "moe-router-pre-softmax": 1},
    # ... noisy at both levels with the paper's importance and Load_H losses; top-1,
    # so that both levels' smooth loads have a threshold (1 of 2 groups, 1 of 2 experts)
    "hier-moe-noisy-losses": {"moe-hierarchical-groups": 2, "moe-router-type": "noisy_topk",
                              "moe-router-topk": 1, "moe-importance-loss-coeff": 0.01,
                              "moe-load-loss-coeff": 0.01},
    # Switch's expert dropout: masks keyed by (seed, step, layer, expert, token)
    "expert-dropout": {"moe-expert-dropout": 0.3},
    "expert-dropout-overlap": {"moe-expert-dropout": 0.3, "moe-overlap-chunks": 2},
    "expert-dropout-hier": {"moe-expert-dropout": 0.3, "moe-token-dispatcher-type": "hierarchical",
                            "ranks-per-node": 1},
}
# The hierarchical dispatcher on emulated nodes of n ranks: the dropped base
# moved by another transport, so its reference is the base's 1-rank run.
for n in (1, 2, 3):
    VARIANTS[f"hierarchical-nodes-of-{n}"] = {"moe-token-dispatcher-type": "hierarchical",
                                              "ranks-per-node": n}
# Expert work overlapping the exchange, in 2 chunks and in more than the local experts.
for k in (2, 4):
    VARIANTS[f"overlap-{k}"] = {"moe-overlap-chunks": k}
OVERLAP = [("overlap-2", 2, 2), ("overlap-2", 4, 2), ("overlap-4", 6, 2), ("overlap-2", 4, 4)]
# Gradient buckets reduced during backward (--overlap-grad-reduce 1), alone,
# with the overlapped exchange and with the hierarchical dispatcher; each run
# is also compared with the same layout's blocking reduction.
VARIANTS["grad-overlap"] = {"overlap-grad-reduce": 1}
VARIANTS["grad-overlap-chunks-2"] = {"overlap-grad-reduce": 1, "moe-overlap-chunks": 2}
VARIANTS["grad-overlap-hierarchical"] = {"overlap-grad-reduce": 1,
                                         **VARIANTS["hierarchical-nodes-of-2"]}
BLOCKING_TWIN = {"grad-overlap": "dropped", "grad-overlap-chunks-2": "overlap-2",
                 "grad-overlap-hierarchical": "hierarchical-nodes-of-2"}
# EP 1 and EP 2 of 4 ranks sum expert gradients across ranks too (EDP of 2 or 4).
GRAD_OVERLAP = [("grad-overlap", 2, 1), ("grad-overlap", 2, 2), ("grad-overlap", 4, 2),
                ("grad-overlap", 4, 4), ("grad-overlap-chunks-2", 2, 2),
                ("grad-overlap-chunks-2", 4, 4), ("grad-overlap-hierarchical", 4, 2)]
# Expert shadowing (FasterMoE): a shadow taken whenever it saves a row, so
# these tiny runs shadow often; with expert dropout, with SwiGLU experts (w1
# twice as tall), and with --overlap-grad-reduce collecting the partials the
# shadows send. The reference is the variant's own 1-rank run.
SHADOWING = {"moe-expert-shadowing": 1, "moe-shadow-min-rows": 1}
VARIANTS["shadow"] = SHADOWING
VARIANTS["shadow-dropout"] = {**SHADOWING, "moe-expert-dropout": 0.3}
VARIANTS["shadow-swiglu"] = {**SHADOWING, "moe-expert-activation": "swiglu"}
VARIANTS["shadow-grad-overlap"] = {**SHADOWING, "overlap-grad-reduce": 1}
SHADOW = [("shadow", 2, 2), ("shadow", 4, 2), ("shadow", 4, 4), ("shadow", 6, 2),
          ("shadow-dropout", 2, 2), ("shadow-dropout", 4, 4), ("shadow-swiglu", 2, 2),
          ("shadow-swiglu", 4, 4), ("shadow-grad-overlap", 4, 2)]
SHADOW_REFERENCE = {"shadow": "dropped", "shadow-dropout": "expert-dropout",
                    "shadow-swiglu": "shadow-swiglu", "shadow-grad-overlap": "dropped"}
SHADOWED = re.compile(r"shadowing: ([0-9.]+)% of the expert rows were computed by their source "
                      r"ranks \((\d+) of (\d+)\)")
# (variant, world, EP): EP groups within a node, across nodes, one rank per
# node, and groups that straddle a node boundary (world 6, nodes of 3, EP 2).
HIERARCHICAL = [("hierarchical-nodes-of-1", 2, 2), ("hierarchical-nodes-of-2", 2, 2),
                ("hierarchical-nodes-of-2", 4, 4), ("hierarchical-nodes-of-2", 4, 2),
                ("hierarchical-nodes-of-1", 4, 4), ("hierarchical-nodes-of-3", 6, 2),
                ("hierarchical-nodes-of-2", 6, 2)]

WORLD_SIZES = [1, 2, 3, 4, 6]  # each divides GLOBAL_BATCH
MATRIX = [(p, ep) for p in WORLD_SIZES for ep in (1, 2, 4) if p % ep == 0 and EXPERTS % ep == 0]
SUBSET = [(2, 2), (3, 1), (4, 2), (6, 2)]
CASES = ([("dropped", p, ep) for p, ep in MATRIX] +
         [(v, p, ep) for v in VARIANTS
          if v != "dropped" and not v.startswith(("hierarchical", "overlap", "grad-overlap",
                                                  "shadow"))
          for p, ep in SUBSET])

# The datasets of the contract, by group; /timing/ and /traffic/ depend on the layout by design.
COMPARED_GROUPS = ("train", "eval", "routing", "specialization")
TIMING_NAME = re.compile(r"time|seconds|_s$")
# Which step each row of a group's datasets belongs to, for failure messages.
STEP_OF_GROUP = {"train": "train/step", "routing": "train/step", "eval": "eval/step",
                 "specialization": "specialization/step"}


def is_timing(name, units):
    """Wall-clock datasets (seconds, or a rate per second) differ between any two runs."""
    return bool(TIMING_NAME.search(name.rsplit("/", 1)[-1])) or units == "s" or \
        units.endswith("/s")


def load_run(out, save):
    """The compared datasets of a record, its attributes, the names it left out
    as timings, the saved parameters, and the /traffic/ datasets (not compared:
    they depend on the layout)."""
    data, skipped = {}, []
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        traffic = {f"traffic/{name}": ds[()] for name, ds in f["traffic"].items()}
        for group in COMPARED_GROUPS:
            for name, ds in f[group].items():
                path = f"{group}/{name}"
                units = ds.attrs.get("units", "")
                units = units.decode() if isinstance(units, bytes) else str(units)
                if group == "train" and is_timing(path, units):
                    skipped.append(path)
                else:
                    data[path] = ds[()]
    with h5py.File(final_checkpoint(save), "r") as f:
        params = {f"params/{name}": ds[()] for name, ds in f["params"].items()}
    return {"data": data, "params": params, "attrs": attrs, "skipped": sorted(skipped),
            "traffic": traffic}


class Runs:
    """Runs each (variant, world size, EP, group size, repeat) once per module;
    a failed run is remembered so the tests that share it fail without rerunning it."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache = {}

    def get(self, variant, world, ep, group=GROUP, repeat=0):
        key = (variant, world, ep, group, repeat)
        if key not in self.cache:
            self.cache[key] = self._run(key)
        run = self.cache[key]
        if isinstance(run, str):
            pytest.fail(run)
        return run

    def _run(self, key):
        variant, world, ep, group, repeat = key
        d = self.tmp.mktemp(f"{variant}-p{world}-ep{ep}-g{group}-r{repeat}")
        out, save = d / "run.h5", d / "checkpoints"
        options = {**TINY, **BASE, **VARIANTS[variant], "moe-group-size": group,
                   "micro-batch-size": GLOBAL_BATCH // world,
                   "expert-model-parallel-size": ep, "out": out, "save": save}
        try:
            result = (run_moesim("train", options, timeout=RUN_TIMEOUT) if world == 1
                      else run_mpi(world, "train", options, timeout=RUN_TIMEOUT))
        except subprocess.TimeoutExpired:
            return f"{key}: no result within {RUN_TIMEOUT}s"
        if result.returncode != 0:
            return f"{key} failed (status {result.returncode}):\n{result.stdout}{result.stderr}"
        run = load_run(out, save)
        run["stdout"] = result.stdout
        if run["attrs"].get("status") != "complete":
            return f"{key}: record status {run['attrs'].get('status')!r}"
        return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


def unequal(a, b):
    """Where a and b differ, a NaN equalling a NaN (as np.array_equal's equal_nan)."""
    same = a == b
    if a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(b)
    return ~same


def differences(got, want, steps):
    """One line per dataset that is not np.array_equal, earliest step first:
    the first differing index (with the step it belongs to) and both values."""
    assert got.keys() == want.keys(), (
        f"datasets only here: {sorted(got.keys() - want.keys())}, "
        f"only in the 1-rank run: {sorted(want.keys() - got.keys())}")
    found = []
    for name in sorted(want):
        a, b = got[name], want[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append((-1, f"{name}: {a.dtype}{list(a.shape)} vs 1-rank "
                              f"{b.dtype}{list(b.shape)}"))
            continue
        if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
            continue
        mask = unequal(a, b)
        index = tuple(int(i) for i in np.argwhere(mask)[0])
        step_name = STEP_OF_GROUP.get(name.split("/")[0])
        if step_name and a.ndim:
            step = int(steps[step_name][index[0]])
            where = f"step {step} (row {index[0]}), index {index}"
        else:
            step, where = STEPS + 1, f"index {index}"  # final parameters: after every step
        count = int(np.count_nonzero(mask))
        found.append((step, f"{name} first differs at {where}: {a[index]!r} vs 1-rank "
                            f"{b[index]!r} ({count} of {a.size} elements differ)"))
    return [line for _, line in sorted(found, key=lambda item: item[0])]


def assert_identical(run, ref, what, reference="the 1-rank run"):
    """Where "1-rank" appears in a difference line, read `reference`."""
    steps = {name: ref["data"][name] for name in set(STEP_OF_GROUP.values())}
    lines = differences(run["data"], ref["data"], steps) + \
        differences(run["params"], ref["params"], steps)
    assert not lines, f"{what} is not bit-identical to {reference}:\n  " + "\n  ".join(lines)


# ---- the contract's datasets are what the tests compare -------------------------------

def test_compared_datasets_cover_the_contract(runs):
    """Guards against comparing too little: every group of the contract is
    present and non-empty, only wall-clock datasets of /train/ are left out,
    and the losses, routing counts and parameters are among the compared."""
    ref = runs.get("dropped", 1, 1)
    names = ref["data"].keys()
    for group in COMPARED_GROUPS:
        assert any(n.startswith(group + "/") for n in names), f"no {group}/ dataset compared"
    for name in ("train/loss", "train/grad_norm", "eval/loss", "routing/tokens_per_expert",
                 "routing/dropped_per_expert", "routing/mean_prob", "specialization/counts",
                 "routing/group_expert_counts", "routing/group_expert_drops"):
        assert name in names, name
    assert ref["skipped"], "no timing dataset found in /train/: did the record's names change?"
    assert "train/loss" not in ref["skipped"]
    assert ref["params"], "--save wrote no parameters"
    assert ref["data"]["train/step"].shape == (STEPS,)
    assert len(ref["data"]["eval/step"]) >= 2
    print(f"compared: {sorted(names)} and {len(ref['params'])} parameter tensors "
          f"{sorted(ref['params'])}; left out as timings: {ref['skipped']}")


# ---- the variants test what they claim -------------------------------------------------

def test_group_counts_add_up_to_processed(runs):
    """/routing/group_expert_counts is what `moesim project` replays: one row
    per step of kept assignments per (routing group, expert), the groups of the
    global batch; summed over groups they are processed_per_expert."""
    data = runs.get("dropped", 1, 1)["data"]
    counts = data["routing/group_expert_counts"]
    assert counts.dtype == np.int32
    assert counts.shape == (STEPS, 2, GLOBAL_BATCH * SEQ // GROUP, EXPERTS)
    assert np.array_equal(data["routing/group_counts_step"], data["train/step"])
    assert np.array_equal(counts.sum(axis=2), data["routing/processed_per_expert"])
    assert (counts.max(axis=(0, 1, 3)) > 0).all(), "a routing group kept nothing"
    # and the dropped ones, summed over groups, are dropped_per_expert
    drops = data["routing/group_expert_drops"]
    assert drops.dtype == np.int32 and drops.shape == counts.shape
    assert drops.sum() > 0, "the dropping variant dropped nothing: the check is vacuous"
    assert np.array_equal(drops.sum(axis=2), data["routing/dropped_per_expert"])


def test_base_variant_drops_tokens(runs):
    data = runs.get("dropped", 1, 1)["data"]
    assert data["routing/dropped_per_expert"].sum() > 0, \
        "capacity factor 1.0 dropped nothing: the base variant does not test dropping"


def test_dropless_variant_drops_nothing(runs):
    data = runs.get("dropless", 1, 1)["data"]
    assert data["routing/dropped_per_expert"].sum() == 0
    assert np.array_equal(data["routing/processed_per_expert"], data["routing/tokens_per_expert"])


VARIANT_ATTRS = {
    "dropless": {"config.moe_expert_capacity_factor": 0},
    "global-aux-loss": {"config.moe_router_load_balancing_type": "global_aux_loss"},
    "noisy-topk": {"config.moe_router_type": "noisy_topk"},
    "gshard-top2": {"config.moe_router_type": "gshard_top2"},
    "expert-bias": {"config.moe_router_enable_expert_bias": 1},
}


@pytest.mark.parametrize("variant", list(VARIANT_ATTRS))
def test_variant_config_reached_the_run(runs, variant):
    """The record's resolved config shows the variant's setting, so a renamed
    flag cannot silently turn a variant into the base run."""
    attrs = runs.get(variant, 1, 1)["attrs"]
    for key, want in VARIANT_ATTRS[variant].items():
        got = attrs[key]
        got = got.decode() if isinstance(got, bytes) else got
        assert got == want, f"{variant}: {key} = {got!r}"
    if variant == "expert-bias":
        bias = runs.get(variant, 1, 1)["data"]["routing/expert_bias"]
        assert np.any(bias != 0), "the expert bias never moved"


# ---- the layout matrix -------------------------------------------------------------------

@pytest.mark.parametrize("variant,world,ep", CASES,
                         ids=[f"{v}-world{p}-ep{e}" for v, p, e in CASES])
def test_layout_is_bit_identical_to_one_rank(runs, variant, world, ep):
    """The P=1 case is a second 1-rank run: it shows the reference itself is
    deterministic, so any other mismatch is the layout's doing."""
    ref = runs.get(variant, 1, 1)
    run = runs.get(variant, world, ep, repeat=1 if world == 1 else 0)
    attrs = run["attrs"]
    assert (attrs["world_size"], attrs["ep_size"]) == (world, ep)
    assert attrs["config.micro_batch_size"] * world == GLOBAL_BATCH
    assert_identical(run, ref, f"{variant}: world {world} EP {ep} "
                               f"(micro-batch {GLOBAL_BATCH // world})")


@pytest.mark.parametrize("variant,world,ep", HIERARCHICAL,
                         ids=[f"{v}-world{p}-ep{e}" for v, p, e in HIERARCHICAL])
def test_hierarchical_dispatch_is_bit_identical_to_one_rank(runs, variant, world, ep):
    """Rows gathered per (emulated) node, exchanged between nodes and
    scattered land where the all-to-all puts them: the run equals the 1-rank
    run of the base config bit for bit."""
    ref = runs.get("dropped", 1, 1)
    run = runs.get(variant, world, ep)
    attrs = run["attrs"]
    assert attrs["config.moe_token_dispatcher_type"] in ("hierarchical", b"hierarchical")
    assert (attrs["world_size"], attrs["ep_size"]) == (world, ep)
    assert_identical(run, ref, f"{variant}: world {world} EP {ep}")


@pytest.mark.parametrize("variant,world,ep", OVERLAP,
                         ids=[f"{v}-world{p}-ep{e}" for v, p, e in OVERLAP])
def test_overlapped_exchange_is_bit_identical_to_one_rank(runs, variant, world, ep):
    """Non-blocking per-expert exchanges with expert work in between move the
    same rows into the same places: the run equals the base's 1-rank run."""
    ref = runs.get("dropped", 1, 1)
    run = runs.get(variant, world, ep)
    assert run["attrs"]["config.moe_overlap_chunks"] == VARIANTS[variant]["moe-overlap-chunks"]
    assert_identical(run, ref, f"{variant}: world {world} EP {ep}")


@pytest.mark.parametrize("variant,world,ep", GRAD_OVERLAP,
                         ids=[f"{v}-world{p}-ep{e}" for v, p, e in GRAD_OVERLAP])
def test_overlapped_gradient_reduction_is_bit_identical(runs, variant, world, ep):
    """Buckets of gradients summed without blocking while the backward pass
    goes on give the blocking reduction's bits: the run equals the base's
    1-rank run and the same layout with --overlap-grad-reduce 0."""
    run = runs.get(variant, world, ep)
    assert run["attrs"]["config.overlap_grad_reduce"] == 1
    assert (run["attrs"]["world_size"], run["attrs"]["ep_size"]) == (world, ep)
    assert_identical(run, runs.get("dropped", 1, 1), f"{variant}: world {world} EP {ep}")
    twin = runs.get(BLOCKING_TWIN[variant], world, ep)
    assert twin["attrs"]["config.overlap_grad_reduce"] == 0
    assert_identical(run, twin, f"{variant}: world {world} EP {ep}",
                     reference=f"{BLOCKING_TWIN[variant]} (--overlap-grad-reduce 0)")


@pytest.mark.parametrize("variant,world,ep", SHADOW,
                         ids=[f"{v}-world{p}-ep{e}" for v, p, e in SHADOW])
def test_shadowed_experts_give_the_one_rank_bits(runs, variant, world, ep):
    """Sources that compute their own rows of a busy rank's expert, with a
    copy of its weights, and send the weight gradient back per grain, give
    the 1-rank run bit for bit; and they did shadow (the run says how many
    expert rows, and it is not none)."""
    run = runs.get(variant, world, ep)
    assert run["attrs"]["config.moe_expert_shadowing"] == 1
    assert run["attrs"]["config.moe_shadow_min_rows"] == 1
    shadowed = SHADOWED.search(run["stdout"])
    assert shadowed, f"{variant} world {world} EP {ep} shadowed nothing:\n{run['stdout']}"
    assert 0 < int(shadowed.group(2)) < int(shadowed.group(3))
    # The record has them per step and MoE layer; they were not sent, so the
    # dispatch bytes and the shadowed rows together are the kept rows.
    rows = run["traffic"]["traffic/shadowed_rows"]
    assert rows.shape == (STEPS, TINY["num-layers"])
    assert rows.sum() == int(shadowed.group(2))
    routing = run["data"]
    kept = (routing["routing/tokens_per_expert"] - routing["routing/dropped_per_expert"]).sum(
        axis=(1, 2))
    sent = run["traffic"]["traffic/dispatch_bytes"].sum(axis=(1, 2))
    assert np.array_equal(sent + rows.sum(axis=1) * TINY["hidden-size"] * 4,
                          kept * TINY["hidden-size"] * 4)
    ref = runs.get(SHADOW_REFERENCE[variant], 1, 1)
    assert "shadowing:" not in ref["stdout"]
    assert not ref["traffic"]["traffic/shadowed_rows"].any()
    assert_identical(run, ref, f"{variant}: world {world} EP {ep}",
                     reference=f"{SHADOW_REFERENCE[variant]} on 1 rank")


def test_two_sequence_groups_split_across_ranks(runs):
    """The same global batch split differently (2 ranks of 6 sequences vs 1 of
    12) with routing groups of two sequences, so the grain of the exact
    reduction is not tied to one sequence. EP 1: every gradient, dense and
    expert, reaches the other rank through a float reduction."""
    group = 2 * SEQ
    ref = runs.get("dropped", 1, 1, group=group)
    run = runs.get("dropped", 2, 1, group=group)
    assert run["attrs"]["config.moe_group_size"] == ref["attrs"]["config.moe_group_size"] == group
    assert ref["data"]["routing/dropped_per_expert"].sum() > 0
    assert_identical(run, ref, f"world 2 EP 1 (micro-batch 6, group {group})")


# ---- bad input: a routing group split across ranks --------------------------------------

def record_status(path):
    """None if absent, 'unreadable' if not an HDF5 file, else its status attribute."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            status = f.attrs.get("status")
    except OSError:
        return "unreadable"
    return status.decode() if isinstance(status, bytes) else status


def test_layout_splitting_a_routing_group_is_refused(tmp_path):
    """Micro-batches of 1 sequence cannot hold groups of 2: the run must stop
    before training with one error that names --moe-group-size and suggests
    micro-batch sizes that would work, and leave no record that looks valid."""
    micro, group, world = 1, 2 * SEQ, 2
    out, save = tmp_path / "bad.h5", tmp_path / "bad-checkpoints"
    options = {**TINY, "micro-batch-size": micro, "moe-group-size": group, "out": out,
               "save": save}
    result = run_mpi(world, "train", options, timeout=RUN_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in output.splitlines() if "moesim: error:" in line]
    assert len(errors) == 1, output
    error = errors[0]
    assert "--moe-group-size" in error, error
    assert "micro-batch-size" in error, error

    def works(n):
        return n > 0 and n * SEQ % group == 0

    # Every size the message offers as --micro-batch-size N must work ...
    offered = [int(n) for n in re.findall(r"--micro-batch-size (\d+)", error)]
    wrong = [n for n in offered if n != micro and not works(n)]
    assert not wrong, f"suggests micro-batch sizes that split a group: {wrong}: {error}"
    # ... and at least one working size must be named; the seq length and group
    # size are echoes of the input, not suggestions.
    after = error[error.index("micro-batch-size"):]
    suggested = {int(n) for n in re.findall(r"\b\d+\b", after)
                 if works(int(n)) and int(n) not in (SEQ, group)}
    assert suggested, f"no working --micro-batch-size suggested: {error}"
    assert record_status(out) in (None, "unreadable", "failed"), record_status(out)
    assert not save.exists() or not any(save.iterdir())


def test_dense_model_ignores_the_expert_count_and_keeps_the_contract(tmp_path):
    """--dense 1 has no experts to share out: 3 experts on 2 ranks are accepted
    (an MoE model is refused), and the 2-rank run equals the 1-rank run."""
    options = {**TINY, "dense": 1, "num-experts": 3, "train-iters": 8, "moe-group-size": GROUP}
    losses = []
    for world in (1, 2):
        out = tmp_path / f"dense{world}.h5"
        opts = {**options, "micro-batch-size": GLOBAL_BATCH // world, "out": out}
        result = run_moesim("train", opts, timeout=RUN_TIMEOUT) if world == 1 else \
            run_mpi(world, "train", opts, timeout=RUN_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        with h5py.File(out, "r") as f:
            losses.append((f["train/loss"][()], f["eval/loss"][()]))
    assert np.array_equal(losses[0][0], losses[1][0])
    assert np.array_equal(losses[0][1], losses[1][1])
    moe = run_mpi(2, "train", {**options, "dense": 0, "micro-batch-size": GLOBAL_BATCH // 2,
                               "out": tmp_path / "moe.h5"}, timeout=RUN_TIMEOUT)
    assert moe.returncode != 0 and "cannot share --num-experts 3" in moe.stderr, moe.stderr
