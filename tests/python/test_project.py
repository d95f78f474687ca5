"""`moesim project` (issue 15): replaying a recorded run on other layouts.

Exact traffic: the projection of a 1-rank run to P = 2 and 4 ranks (EP = P
and EP = P/2) must equal, byte for byte (np.array_equal), the
/traffic/dispatch_bytes that real P-rank runs of the same config record.
Bad input: each refusal is one clear message and a non-zero exit.
"""
import subprocess

import h5py
import numpy as np
import pytest

from moesim_run import BUILD, clean_env, run_moesim, run_mpi

SEQ = 16
GLOBAL_BATCH = 8   # sequences per step, whatever the layout
GROUP = SEQ        # one sequence per routing group
STEPS = 6
CLUSTERS = BUILD.parent / "experiments" / "clusters"

TINY = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64,
    "train-iters": STEPS, "eval-interval": 100, "eval-iters": 1, "progress-interval": 1000,
    "data-format": "synthetic", "synthetic-tokens": 20000, "moe-expert-capacity-factor": 1.0,
    "moe-group-size": GROUP,
}
# (world, EP, dispatcher): the layouts whose real traffic the projection must reproduce.
LAYOUTS = [(2, 2, "alltoall"), (2, 1, "alltoall"), (4, 4, "alltoall"), (4, 2, "alltoall"),
           (4, 2, "hierarchical")]

# Expert shadowing whenever it saves a row (the runs then shadow often), on
# one EP group and on two.
SHADOWING = {"moe-expert-shadowing": 1, "moe-shadow-min-rows": 1}
SHADOW_LAYOUTS = [(2, 2), (4, 2), (4, 4)]

CLUSTER_INI = """[cluster]
name = test
[device]
peak_flops_fp32 = 1e11
peak_flops_bf16 = 2e11
memory_bandwidth = 2e10
matmul_efficiency = 0.5
[node]
devices_per_node = 2
intra_bandwidth = 5e9
intra_latency = 2e-6
[network]
inter_bandwidth = 1.25e8
inter_latency = 5e-5
nics_per_node = 1
oversubscription = 1
allreduce = ring
"""


def project(record, cluster, *args, timeout=120):
    cmd = [str(BUILD / "moesim"), "project", str(record), "--cluster", str(cluster), *map(str, args)]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def train(tmp, name, world, extra=None):
    out = tmp / f"{name}.h5"
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // world, "out": out, **(extra or {})}
    result = run_moesim("train", options, timeout=120) if world == 1 else \
        run_mpi(world, "train", options, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("project")
    cluster = tmp / "cluster.ini"
    cluster.write_text(CLUSTER_INI)
    one = train(tmp, "one", 1)
    real = {}
    for world, ep, dispatcher in LAYOUTS:
        extra = {"expert-model-parallel-size": ep, "moe-token-dispatcher-type": dispatcher}
        if dispatcher == "hierarchical":
            extra["ranks-per-node"] = 2
        real[(world, ep, dispatcher)] = train(tmp, f"p{world}-ep{ep}-{dispatcher}", world, extra)
    for world, ep in SHADOW_LAYOUTS:
        real[(world, ep, "shadowing")] = train(
            tmp, f"p{world}-ep{ep}-shadowing", world,
            {"expert-model-parallel-size": ep, **SHADOWING})
    return {"tmp": tmp, "cluster": cluster, "one": one, "real": real}


@pytest.mark.parametrize("world,ep,dispatcher", LAYOUTS)
def test_projected_traffic_equals_real_runs(runs, world, ep, dispatcher):
    out = runs["tmp"] / f"pred-{world}-{ep}-{dispatcher}.h5"
    result = project(runs["one"], runs["cluster"], "--world-size", world,
                     "--expert-model-parallel-size", ep, "--ranks-per-node", 2,
                     "--moe-token-dispatcher-type", dispatcher, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(runs["real"][(world, ep, dispatcher)], "r") as f:
        real = f["traffic/dispatch_bytes"][()]
        processed = f["routing/processed_per_expert"][()]
    with h5py.File(out, "r") as f:
        predicted = f["projection/dispatch_bytes"][()]
        expert_rows = f["projection/expert_rows"][()]
        steps = f["projection/step"][()]
        step_time = f["projection/step_time_s"][()]
        balanced = f["projection/balanced_step_time_s"][()]
        phases = f["projection/phase_s"][()]
    assert real.shape == (STEPS, world, world)
    assert np.array_equal(steps, np.arange(1, STEPS + 1))
    assert np.array_equal(predicted, real), (predicted[0], real[0])
    # each rank's experts compute what its EP peers send it: the step's kept rows in total
    assert np.array_equal(expert_rows.sum(axis=2), processed.sum(axis=2))
    assert phases.shape == (STEPS, world, 8)
    assert (step_time > 0).all() and (balanced > 0).all()
    assert np.allclose(step_time, phases.sum(axis=2).max(axis=1), rtol=1e-12)


@pytest.mark.parametrize("world,ep", SHADOW_LAYOUTS)
def test_projected_shadows_equal_real_runs(runs, world, ep):
    """Planned from the 1-rank record's routing-group counts, the shadows are
    the real run's, block for block: the same rows stay with their sources
    (/traffic/shadowed_rows) and the same rows travel (dispatch_bytes)."""
    out = runs["tmp"] / f"shadow-{world}-{ep}.h5"
    result = project(runs["one"], runs["cluster"], "--world-size", world,
                     "--expert-model-parallel-size", ep, "--moe-expert-shadowing", 1,
                     "--moe-shadow-min-rows", 1, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(runs["real"][(world, ep, "shadowing")], "r") as f:
        real_bytes = f["traffic/dispatch_bytes"][()]
        real_shadowed = f["traffic/shadowed_rows"][()]
        processed = f["routing/processed_per_expert"][()]
    with h5py.File(out, "r") as f:
        assert f.attrs["moe_expert_shadowing"] == 1
        predicted_bytes = f["projection/dispatch_bytes"][()]
        predicted_shadowed = f["projection/shadowed_rows"][()]
        expert_rows = f["projection/expert_rows"][()]
    assert real_shadowed.sum() > 0, "the real runs shadowed nothing: the check is vacuous"
    assert np.array_equal(predicted_shadowed, real_shadowed)
    assert np.array_equal(predicted_bytes, real_bytes)
    # shadowed rows are computed by their sources: every kept row still once
    assert np.array_equal(expert_rows.sum(axis=2), processed.sum(axis=2))
    computed = 100.0 * real_shadowed.sum() / processed.sum()
    assert f"shadowing: {computed:.1f}% of the expert rows computed by their source ranks" in \
        result.stdout, result.stdout


def test_projected_shadows_even_out_the_experts_and_cost_their_weights(runs):
    """Against the same projection without shadowing, the busiest rank's
    expert rows go down, and the weights sent out and the gradients back add
    exchange time that the rows' bytes alone do not explain."""
    def projected(*flags):
        out = runs["tmp"] / f"even-{len(flags)}.h5"
        result = project(runs["one"], runs["cluster"], "--world-size", 2, *flags, "--out", out)
        assert result.returncode == 0, result.stdout + result.stderr
        with h5py.File(out, "r") as f:
            phases = [p.decode() if isinstance(p, bytes) else p for p in f.attrs["phases"]]
            dispatch = f["projection/phase_s"][()][:, :, phases.index("dispatch")]
            return f["projection/expert_rows"][()], dispatch, f["projection/dispatch_bytes"][()]
    plain_rows, plain_dispatch, plain_bytes = projected()
    rows, dispatch, sent = projected("--moe-expert-shadowing", 1, "--moe-shadow-min-rows", 1)
    assert rows.max(axis=2).sum() < plain_rows.max(axis=2).sum()
    assert np.array_equal(rows.sum(axis=2), plain_rows.sum(axis=2))
    moved = sent.sum() - np.trace(sent, axis1=1, axis2=2).sum()
    plain_moved = plain_bytes.sum() - np.trace(plain_bytes, axis1=1, axis2=2).sum()
    assert moved < plain_moved
    # fewer rows cross ranks, yet the dispatch takes longer: the weights went too
    assert dispatch.sum() > plain_dispatch.sum()


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_drops_per_virtual_rank_are_those_of_its_experts_groups(runs, world, ep):
    """Each routing group's drops are charged to the rank holding the expert
    for that group's EP group: with EP = P a rank's drops are its experts'
    dropped_per_expert; with EP < P the replicas split an expert's drops by
    the groups they serve. Computed here from /routing/group_expert_drops."""
    out = runs["tmp"] / f"drops-{world}-{ep}.h5"
    result = project(runs["one"], runs["cluster"], "--world-size", world,
                     "--expert-model-parallel-size", ep, "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(runs["one"], "r") as f:
        drops = f["routing/group_expert_drops"][()]        # [S, L, groups, E]
        per_expert = f["routing/dropped_per_expert"][()]
    with h5py.File(out, "r") as f:
        per_rank = f["projection/dropped_per_rank"][()]    # [S, L, P]
        projected_per_expert = f["projection/dropped_per_expert"][()]
    S, L, groups, E = drops.shape
    assert drops.sum() > 0, "TINY at capacity 1.0 dropped nothing: the check is vacuous"
    expected = np.zeros((S, L, world), dtype=np.int64)
    per_group_rank = groups // world
    for g in range(groups):
        source = g // per_group_rank
        first = source // ep * ep
        for e in range(E):
            expected[:, :, first + e // (E // ep)] += drops[:, :, g, e]
    assert np.array_equal(per_rank, expected)
    assert np.array_equal(per_rank.sum(axis=2), projected_per_expert.sum(axis=2))
    assert np.array_equal(projected_per_expert, per_expert)
    if ep == world:
        assert np.array_equal(per_rank, per_expert.reshape(S, L, world, E // world).sum(axis=3))


def test_projection_from_a_multi_rank_record_equals_from_one_rank(runs):
    """The record of a 2-rank run replays like the 1-rank run's: group counts
    are layout-invariant, so any record of the config projects alike."""
    outs = []
    for name, record in (("from1", runs["one"]), ("from2", runs["real"][(2, 2, "alltoall")])):
        out = runs["tmp"] / f"{name}.h5"
        result = project(record, runs["cluster"], "--world-size", 4, "--out", out)
        assert result.returncode == 0, result.stderr
        with h5py.File(out, "r") as f:
            outs.append(f["projection/dispatch_bytes"][()])
    assert np.array_equal(outs[0], outs[1])


def test_capacity_reapplied_to_a_dropless_record_matches_a_real_run(runs, tmp_path):
    """A dropless record's kept counts are the router's demand; capacity
    factor 1.0 keeps min(demand, capacity) per group and expert. The first MoE
    layer of the first step routes the same inputs in both runs, so its kept
    and dropped counts must equal a real capacity-1.0 run's exactly (deeper
    layers see the drops of the first, and later steps train differently)."""
    dropless = train(tmp_path, "dropless", 1, {"moe-expert-capacity-factor": 0})
    out = tmp_path / "cf1.h5"
    result = project(dropless, runs["cluster"], "--world-size", 2, "--moe-expert-capacity-factor",
                     1.0, "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(runs["real"][(2, 2, "alltoall")], "r") as f:
        real_processed = f["routing/processed_per_expert"][0, 0]
        real_dropped = f["routing/dropped_per_expert"][0, 0]
    with h5py.File(out, "r") as f:
        expert_rows = f["projection/expert_rows"][0, 0]
        dropped = f["projection/dropped_per_expert"][0, 0]
        dropped_per_rank = f["projection/dropped_per_rank"][0, 0]
    with h5py.File(runs["real"][(2, 2, "alltoall")], "r") as f:
        real_group_drops = f["routing/group_expert_drops"][0, 0]   # [groups, E]
    assert real_dropped.sum() > 0
    assert np.array_equal(dropped, real_dropped)
    # the real run's drops at each rank's experts (EP 2: experts 0-1 on rank 0)
    assert np.array_equal(dropped_per_rank, real_group_drops.sum(axis=0).reshape(2, 2).sum(axis=1))
    assert np.array_equal(expert_rows, real_processed.reshape(2, 2).sum(axis=1))
    refused(project(runs["one"], runs["cluster"], "--world-size", 2,
                    "--moe-expert-capacity-factor", 2), "needs a dropless record")


def test_summary_names_step_time_mfu_and_bottleneck(runs):
    result = project(runs["one"], runs["cluster"], "--world-size", 4,
                     "--expert-model-parallel-size", 4)
    assert result.returncode == 0, result.stderr
    for words in ("step time", "balanced routing", "imbalance costs", "MFU", "bottleneck rank",
                  "exposed communication", "busiest node link"):
        assert words in result.stdout, result.stdout


def test_imbalance_never_beats_balanced_routing(runs):
    out = runs["tmp"] / "balanced.h5"
    assert project(runs["one"], runs["cluster"], "--world-size", 4, "--out", out).returncode == 0
    with h5py.File(out, "r") as f:
        assert (f["projection/step_time_s"][()] >= f["projection/balanced_step_time_s"][()]).all()


def phases_of(path):
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["phases"]]
        return names, f["projection/phase_s"][()]


def test_vector_rates_add_their_units_at_their_rate(runs):
    """[vector] <phase> = rate adds, per rank, the phase's units over the
    rate and nothing else: the optimizer's units are the rank's parameters
    (dense + its share of the experts), the other phase's N (V + C)."""
    world, ep, rates = 2, 2, {"optimizer": 1e6, "other": 2e6}
    plain, vector = runs["tmp"] / "plain.h5", runs["tmp"] / "vector.h5"
    cluster = runs["tmp"] / "vector.ini"
    cluster.write_text(CLUSTER_INI + "[vector]\n" +
                       "".join(f"{k} = {v}\n" for k, v in rates.items()))
    for ini, out in ((runs["cluster"], plain), (cluster, vector)):
        result = project(runs["one"], ini, "--world-size", world, "--expert-model-parallel-size",
                         ep, "--out", out)
        assert result.returncode == 0, result.stderr
    names, before = phases_of(plain)
    _, after = phases_of(vector)
    with h5py.File(runs["one"], "r") as f:
        C, F, E = (int(f.attrs[f"config.{k}"]) for k in
                   ("hidden_size", "moe_ffn_hidden_size", "num_experts"))
        L, V = int(f.attrs["config.num_layers"]), int(f.attrs["vocab_size"])
        experts_all = L * E * 2 * C * F   # every layer is an MoE layer in TINY
        local = int(f.attrs["params_total"]) - experts_all + experts_all // ep
    N = GLOBAL_BATCH * SEQ / world
    added = after - before
    expected = {"optimizer": local / rates["optimizer"], "other": N * (V + C) / rates["other"]}
    for i, name in enumerate(names):
        want = expected.get(name, 0.0)
        np.testing.assert_allclose(added[:, :, i], want, rtol=1e-9, atol=1e-15, err_msg=name)


def test_calibrate_writes_a_cluster_file_with_fitted_vector_rates(tmp_path):
    """`moesim calibrate` trains a few steps of the config and writes, per
    phase, the seconds measured and modelled; a rate only for a compute
    phase whose measurement exceeds the model, and `moesim project` reads
    the file."""
    out = tmp_path / "here.ini"
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // 2, "out": out}
    result = run_mpi(2, "calibrate", options, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert "[vector]" in text, text
    vector = text.split("[vector]")[1]
    fitted = 0
    for phase in ("attention", "router", "dispatch", "experts", "combine", "grad_allreduce",
                  "optimizer", "other"):
        line = next(l for l in vector.splitlines() if l.startswith(f"; {phase}: measured"))
        measured, modelled = (float(w) for w in
                              (line.split("measured ")[1].split(" s")[0],
                               line.split("without this key ")[1].split(" s")[0]))
        rate = [l for l in vector.splitlines() if l.startswith(f"{phase} = ")]
        communication = phase in ("dispatch", "combine", "grad_allreduce")
        assert bool(rate) == (measured > modelled and not communication), (phase, line, rate)
        fitted += bool(rate)
    assert fitted >= 3, vector   # CPU softmaxes, selection and AdamW are never free
    record = tmp_path / "one.h5"
    train_result = run_moesim("train", {**TINY, "micro-batch-size": GLOBAL_BATCH, "out": record},
                              timeout=120)
    assert train_result.returncode == 0, train_result.stderr
    assert project(record, out, "--world-size", 2).returncode == 0


# ---- bad input ------------------------------------------------------------------------

def refused(result, *words):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("edit,words", [
    (("memory_bandwidth = 2e10\n", ""), ("[device] memory_bandwidth is missing",)),
    (("inter_latency = 5e-5", "inter_latency = 0"), ("inter_latency = 0", "positive")),
    (("nics_per_node = 1", "nics_per_node = -2"), ("nics_per_node = -2", "positive")),
    (("allreduce = ring", "allreduce = star"), ("neither ring nor tree",)),
    (("allreduce = ring", "allreduce = ring\n[vector]\nattn = 1e9"),
     ("unknown key [vector] attn", "the keys are the phases")),
    (("allreduce = ring", "allreduce = ring\n[vector]\noptimizer = 0"),
     ("[vector] optimizer = 0", "positive")),
])
def test_bad_cluster_file_is_refused(runs, edit, words):
    bad = runs["tmp"] / "bad.ini"
    bad.write_text(CLUSTER_INI.replace(*edit))
    refused(project(runs["one"], bad, "--world-size", 2), str(bad), *words)


def test_world_size_splitting_a_routing_group_is_refused(runs, tmp_path):
    record = train(tmp_path, "big-groups", 1, {"moe-group-size": 4 * SEQ})
    line = refused(project(record, runs["cluster"], "--world-size", 4), "splits a routing group",
                   "--world-size 4")
    assert "e.g. 2" in line


def test_world_size_splitting_a_sequence_is_refused(runs):
    refused(project(runs["one"], runs["cluster"], "--world-size", 3), "splits a sequence")


@pytest.mark.parametrize("world,ep", [(4, 3), (2, 4)])
def test_ep_not_dividing_is_refused(runs, world, ep):
    refused(project(runs["one"], runs["cluster"], "--world-size", world,
                    "--expert-model-parallel-size", ep),
            f"--expert-model-parallel-size {ep} must divide")


@pytest.mark.parametrize("flags,words", [
    (("--moe-expert-shadowing", 2), ("--moe-expert-shadowing is 0 or 1", "got 2")),
    (("--moe-expert-shadowing", 1, "--moe-token-dispatcher-type", "hierarchical"),
     ("--moe-expert-shadowing 1", "--moe-token-dispatcher-type alltoall",
      "--moe-expert-shadowing 0")),
    (("--moe-expert-shadowing", 1, "--moe-overlap-chunks", 2),
     ("--moe-expert-shadowing 1", "--moe-overlap-chunks 1")),
    (("--moe-shadow-min-rows", -1), ("--moe-shadow-min-rows needs a whole number >= 0",)),
])
def test_bad_shadowing_flags_are_refused(runs, flags, words):
    refused(project(runs["one"], runs["cluster"], "--world-size", 2, *flags), *words)


def test_record_without_group_counts_is_refused(runs, tmp_path):
    record = train(tmp_path, "no-groups", 1, {"record-group-counts-interval": 0})
    refused(project(record, runs["cluster"], "--world-size", 2), "group_expert_counts",
            "--record-group-counts-interval")


def test_older_schema_is_refused(runs, tmp_path):
    old = tmp_path / "old.h5"
    with h5py.File(runs["one"], "r") as src, h5py.File(old, "w") as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        dst.attrs["schema_version"] = np.int64(7)
        src.copy("train", dst)
    refused(project(old, runs["cluster"], "--world-size", 2), "schema 7", "re-run")


def test_presets_parse(runs):
    presets = sorted(CLUSTERS.glob("*.ini"))
    assert len(presets) >= 4, presets
    for preset in presets:
        result = project(runs["one"], preset, "--world-size", 2)
        assert result.returncode == 0, f"{preset}: {result.stderr}"


def test_python_project_returns_the_binarys_traffic(runs):
    """moesim_analysis.project runs the binary and reads its --out: the
    traffic frame equals the real 4-rank run's dispatch bytes."""
    import sys
    sys.path.insert(0, str(BUILD.parent / "analysis"))
    from moesim_analysis import ProjectionError, project as project_py
    p = project_py(runs["one"], runs["cluster"], world_size=4, ep=2, binary=BUILD / "moesim")
    with h5py.File(runs["real"][(4, 2, "alltoall")], "r") as f:
        real = f["traffic/dispatch_bytes"][()]
    traffic = p.traffic.sort_values(["step", "src", "dst"]).bytes.to_numpy().reshape(real.shape)
    assert np.array_equal(traffic, real)
    assert list(p.steps.step) == list(range(1, STEPS + 1))
    assert (p.steps.imbalance_cost >= 0).all()
    assert "step time" in p.summary
    with h5py.File(runs["one"], "r") as f:
        dropped = f["routing/dropped_per_expert"][()]
    per_step = p.expert_rows.groupby("step").dropped.sum().to_numpy()
    assert np.array_equal(per_step, dropped.sum(axis=(1, 2)))
    assert p.shadowing.empty
    shadowed = project_py(runs["one"], runs["cluster"], world_size=4, ep=2, shadowing=True,
                          shadow_min_rows=1, binary=BUILD / "moesim").shadowing
    with h5py.File(runs["real"][(4, 2, "shadowing")], "r") as f:
        real_shadowed = f["traffic/shadowed_rows"][()]
    assert np.array_equal(
        shadowed.sort_values(["step", "layer"]).rows.to_numpy().reshape(real_shadowed.shape),
        real_shadowed)
    with pytest.raises(ProjectionError, match="splits a sequence"):
        project_py(runs["one"], runs["cluster"], world_size=3, binary=BUILD / "moesim")
