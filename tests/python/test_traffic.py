"""Inter-node traffic and communication times in the run record (issue 14).

/traffic/internode_bytes[s, i, j]: the token-row bytes every MoE exchange of
step s (dispatch and combine, forward and backward) moved from node i to node
j. Each of the four exchanges carries the forward dispatch's rows or their
reverse, so with D the /traffic/dispatch_bytes matrix summed over node blocks
it is 2 (D + D^T), whichever dispatcher moved the rows; the hierarchical
dispatcher's is measured on its leaders' messages, so equality with the
all-to-all's checks that they carry the payload and nothing else.

/timing/comm: exposed (waiting) and in-flight seconds per kind of
communication, and the hierarchical exchange's stages; every documented
relation between them and the /timing phases is checked here, exactly.

Every run goes through moesim_run with a timeout and happens once per module."""
import h5py
import numpy as np
import pytest

from moesim_run import moesim_info, run_moesim, run_mpi

SEQ = 16
HIDDEN = 32
STEPS = 4
GLOBAL_BATCH = 12
TIMEOUT = 120
TINY = {
    "num-layers": 2, "hidden-size": HIDDEN, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64,
    "train-iters": STEPS, "eval-interval": 50, "eval-iters": 1, "log-interval": 1,
    "progress-interval": 1000, "data-format": "synthetic", "synthetic-tokens": 20000,
    "moe-group-size": SEQ, "lr-warmup-iters": 2, "moe-expert-capacity-factor": 1.0,
}
KINDS = ("dispatch", "combine", "grad_reduce")
STAGES = ("gather", "leaders", "scatter")
PHASES = ("attention", "router", "dispatch", "experts", "combine", "grad_allreduce", "optimizer",
          "other")

# (dispatcher, world, ranks per node, overlap chunks, EP); EP = world unless given.
ALLTOALL = [("alltoall", 2, 1, 1, 2), ("alltoall", 2, 2, 1, 2), ("alltoall", 4, 1, 1, 4),
            ("alltoall", 4, 2, 1, 4), ("alltoall", 4, 2, 1, 2)]
HIERARCHICAL = [("hierarchical", 2, 1, 1, 2), ("hierarchical", 4, 1, 1, 4),
                ("hierarchical", 4, 2, 1, 4), ("hierarchical", 4, 2, 1, 2)]
OVERLAP = [("alltoall", 2, 1, 2, 2), ("alltoall", 4, 2, 2, 4)]
ONE_RANK = ("alltoall", 1, 1, 1, 1)
LAYOUTS = ALLTOALL + HIERARCHICAL + OVERLAP + [ONE_RANK]


def layout_id(layout):
    dispatcher, world, per_node, chunks, ep = layout
    return f"{dispatcher}-w{world}-n{per_node}-k{chunks}-ep{ep}"


def options_of(layout, out, **extra):
    dispatcher, world, per_node, chunks, ep = layout
    return {**TINY, "micro-batch-size": GLOBAL_BATCH // world, "expert-model-parallel-size": ep,
            "moe-token-dispatcher-type": dispatcher, "ranks-per-node": per_node,
            "moe-overlap-chunks": chunks, "out": out, **extra}


def train(layout, out, **extra):
    options = options_of(layout, out, **extra)
    world = layout[1]
    result = (run_moesim("train", options, timeout=TIMEOUT) if world == 1
              else run_mpi(world, "train", options, timeout=TIMEOUT))
    assert result.returncode == 0, f"{out}:\n{result.stdout}{result.stderr}"
    return out


def read(path):
    with h5py.File(path, "r") as f:
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        data["attrs"] = dict(f.attrs)
    return data


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("traffic")
    return {layout: read(train(layout, d / f"{layout_id(layout)}.h5")) for layout in LAYOUTS}


def node_blocks(rank_bytes, node_of_rank, nodes):
    """[S, P, P] rank-to-rank bytes summed into [S, nodes, nodes]."""
    out = np.zeros((rank_bytes.shape[0], nodes, nodes), dtype=np.int64)
    for i, a in enumerate(node_of_rank):
        for j, b in enumerate(node_of_rank):
            out[:, a, b] += rank_bytes[:, i, j]
    return out


def both_ways_four_exchanges(rec):
    """2 (D + D^T): forward and backward, each a dispatch and its combine."""
    d = node_blocks(rec["traffic/dispatch_bytes"], rec["attrs"]["node_of_rank"],
                    int(rec["attrs"]["num_nodes"]))
    return 2 * (d + d.transpose(0, 2, 1))


# ---- /traffic/internode_bytes -------------------------------------------------------------

@pytest.mark.parametrize("layout", ALLTOALL + OVERLAP, ids=layout_id)
def test_alltoall_internode_bytes_are_dispatch_bytes_over_node_blocks(records, layout):
    rec = records[layout]
    _, world, per_node, _, ep = layout
    nodes = world // per_node
    assert rec["attrs"]["num_nodes"] == nodes
    np.testing.assert_array_equal(rec["attrs"]["node_of_rank"], np.arange(world) // per_node)
    internode = rec["traffic/internode_bytes"]
    assert internode.shape == (STEPS, nodes, nodes) and internode.dtype == np.int64
    assert np.array_equal(internode, both_ways_four_exchanges(rec))
    off_diagonal = internode[:, ~np.eye(nodes, dtype=bool)]
    if ep > per_node:  # EP groups span nodes: rows cross, so the block sums were tested
        assert (off_diagonal > 0).all(), internode
    else:  # each EP group within a node: nothing leaves it
        assert (off_diagonal == 0).all(), internode


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_internode_bytes_total_four_exchanges_of_every_processed_row(records, layout):
    """By hand from the routing counts: each processed assignment is one row
    of HIDDEN float32 out and back, forward and backward."""
    rec = records[layout]
    processed = rec["routing/processed_per_expert"].sum(axis=(1, 2))
    expected = 4 * processed * HIDDEN * 4
    assert np.array_equal(rec["traffic/internode_bytes"].sum(axis=(1, 2)), expected)


@pytest.mark.parametrize("layout", HIERARCHICAL, ids=layout_id)
def test_hierarchical_leaders_send_what_alltoall_sends(records, layout):
    rec = records[layout]
    alltoall = records[("alltoall", *layout[1:])]
    assert np.array_equal(rec["routing/processed_per_expert"],
                          alltoall["routing/processed_per_expert"])
    assert np.array_equal(rec["traffic/internode_bytes"], alltoall["traffic/internode_bytes"])
    assert np.array_equal(rec["traffic/internode_bytes"], both_ways_four_exchanges(rec))


@pytest.mark.parametrize("layout", [("alltoall", 2, 2, 1, 2), ONE_RANK], ids=layout_id)
def test_one_node_has_a_one_by_one_matrix_of_its_own_rows(records, layout):
    rec = records[layout]
    internode = rec["traffic/internode_bytes"]
    assert internode.shape == (STEPS, 1, 1)
    processed = rec["routing/processed_per_expert"].sum(axis=(1, 2))
    assert np.array_equal(internode[:, 0, 0], 16 * HIDDEN * processed)
    assert (internode > 0).all()


# ---- /timing/comm -------------------------------------------------------------------------

def comm(rec, what, kind):
    return rec[f"timing/comm/{what}/{kind}"]


def phases_sum(rec):
    return sum(rec[f"timing/{phase}"] for phase in PHASES)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_exposed_is_within_in_flight_and_the_phases(records, layout):
    rec = records[layout]
    world = layout[1]
    for kind in KINDS:
        exposed, in_flight = comm(rec, "exposed", kind), comm(rec, "in_flight", kind)
        assert exposed.shape == (STEPS, world)
        assert (exposed >= 0).all() and (in_flight >= exposed).all(), kind
    moe_exposed = comm(rec, "exposed", "dispatch") + comm(rec, "exposed", "combine")
    assert (moe_exposed <= rec["timing/dispatch"] + rec["timing/combine"]).all()
    assert np.array_equal(comm(rec, "exposed", "grad_reduce"), rec["timing/grad_allreduce"])
    total = sum(comm(rec, "exposed", kind) for kind in KINDS)
    assert (total <= phases_sum(rec)).all()
    assert (total[:, 0] <= rec["train/step_time_s"]).all()
    # nothing is hidden by the gradient reduction while it blocks
    assert np.array_equal(comm(rec, "in_flight", "grad_reduce"), rec["timing/grad_allreduce"])


@pytest.mark.parametrize("layout", ALLTOALL + HIERARCHICAL, ids=layout_id)
def test_blocking_exchanges_hide_nothing(records, layout):
    """With --moe-overlap-chunks 1 (the default) every exchange blocks: in flight exactly
    while it is waited for, each within its own phase."""
    rec = records[layout]
    for kind in KINDS:
        assert np.array_equal(comm(rec, "in_flight", kind), comm(rec, "exposed", kind)), kind
    for kind in ("dispatch", "combine"):
        exposed = comm(rec, "exposed", kind)
        assert (exposed > 0).all(), kind
        assert (exposed <= rec[f"timing/{kind}"]).all(), kind


@pytest.mark.parametrize("layout", OVERLAP, ids=layout_id)
def test_overlapped_exchanges_are_in_flight_longer_than_waited_for(records, layout):
    rec = records[layout]
    for kind in ("dispatch", "combine"):
        exposed, in_flight = comm(rec, "exposed", kind), comm(rec, "in_flight", kind)
        assert (exposed > 0).all(), kind
        assert (in_flight > exposed).any(), kind


def test_one_rank_exchanges_nothing(records):
    rec = records[ONE_RANK]
    for what in ("exposed", "in_flight"):
        for kind in ("dispatch", "combine"):
            assert (comm(rec, what, kind) == 0).all(), (what, kind)


@pytest.mark.parametrize("layout", HIERARCHICAL, ids=layout_id)
def test_hierarchical_stages_sum_within_their_exchange(records, layout):
    rec = records[layout]
    stages_all = 0
    for kind in ("dispatch", "combine"):
        stages = [rec[f"timing/comm/hierarchical/{kind}_{stage}"] for stage in STAGES]
        for values in stages:
            assert values.shape == (STEPS, layout[1]) and (values >= 0).all()
        total = sum(stages)
        assert (total > 0).all(), kind
        assert (total <= comm(rec, "exposed", kind)).all(), kind
        stages_all = stages_all + total
    assert (stages_all <= rec["timing/dispatch"] + rec["timing/combine"]).all()


@pytest.mark.parametrize("layout", ALLTOALL + OVERLAP + [ONE_RANK], ids=layout_id)
def test_without_hierarchy_the_stages_are_zero(records, layout):
    rec = records[layout]
    for kind in ("dispatch", "combine"):
        for stage in STAGES:
            assert (rec[f"timing/comm/hierarchical/{kind}_{stage}"] == 0).all()


# ---- resumes onto another layout ------------------------------------------------------------

@pytest.mark.parametrize("first,then", [(("alltoall", 2, 1, 1, 2), ("hierarchical", 4, 1, 1, 4)),
                                        (("alltoall", 4, 2, 1, 4), ONE_RANK)],
                         ids=["2-nodes-to-4", "2-nodes-to-1"])
def test_resume_on_other_nodes_keeps_internode_bytes_readable(tmp_path, first, then):
    out, save = tmp_path / "run.h5", tmp_path / "ckpt"
    train(first, out, save=save, **{"save-interval": STEPS})
    train(then, out, save=save, load=save, **{"train-iters": 2 * STEPS})
    rec = read(out)
    nodes = [layout[1] // layout[2] for layout in (first, then)]
    worlds = [first[1], then[1]]
    internode = rec["traffic/internode_bytes"]
    assert internode.shape == (2 * STEPS, max(nodes), max(nodes))
    processed = rec["routing/processed_per_expert"].sum(axis=(1, 2))
    assert np.array_equal(internode.sum(axis=(1, 2)), 16 * HIDDEN * processed)
    for part, (n, world, layout) in enumerate(zip(nodes, worlds, (first, then))):
        rows = slice(part * STEPS, (part + 1) * STEPS)
        node_of_rank = np.arange(world) // layout[2]
        d = node_blocks(rec["traffic/dispatch_bytes"][rows][:, :world, :world], node_of_rank, n)
        assert np.array_equal(internode[rows][:, :n, :n], 2 * (d + d.transpose(0, 2, 1)))
        outside = internode[rows].copy()
        outside[:, :n, :n] = 0
        assert (outside == 0).all(), part
        for kind in KINDS:
            exposed = comm(rec, "exposed", kind)[rows]
            assert np.isfinite(exposed[:, :world]).all() and np.isnan(exposed[:, world:]).all()
    # the first layout's node map stays in the root attributes, as its world size does
    assert rec["attrs"]["num_nodes"] == nodes[0]
    assert list(rec["resumes/world_size"]) == [then[1]]
    info = moesim_info(out)
    assert info.returncode == 0, info.stderr
    assert "communication per step" in info.stdout, info.stdout


def test_overlapped_gradient_reduction_is_in_flight_across_the_backward_pass(tmp_path):
    """--overlap-grad-reduce 1: exposed is the grad_allreduce phase (ready-point work and the
    final wait); in flight runs from the first bucket's start, covering the backward compute of
    the layers below it, so it is longer."""
    rec = read(train(("alltoall", 2, 1, 1, 2), tmp_path / "grad.h5", **{"overlap-grad-reduce": 1}))
    exposed, in_flight = comm(rec, "exposed", "grad_reduce"), comm(rec, "in_flight", "grad_reduce")
    assert np.array_equal(exposed, rec["timing/grad_allreduce"])
    assert (exposed > 0).all() and (in_flight > exposed).all(), (exposed, in_flight)
    total = sum(comm(rec, "exposed", kind) for kind in KINDS)
    assert (total <= phases_sum(rec)).all()
    assert (total[:, 0] <= rec["train/step_time_s"]).all()
