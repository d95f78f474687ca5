"""projection: `moesim project` from Python (README, "Projection and calibration").

    from moesim_analysis import project
    p = project("runs/bench.h5", "experiments/clusters/h100_nvlink_ib400.ini",
                world_size=64, ep=16, ranks_per_node=8)
    p.steps          # step, step_time_s, balanced_step_time_s, imbalance_cost, mfu
    p.phases         # step, rank, phase, seconds, balanced_seconds
    p.traffic        # step, src, dst, bytes (rank pairs; empty above 256 ranks)
    p.node_traffic   # step, src_node, dst_node, bytes
    p.expert_rows    # step, layer, rank, rows, dropped (at the rank's experts)
    p.shadowing      # step, layer, rows (with shadowing=True; else empty)

The model and the traffic are the binary's (build/moesim project), not a
second implementation, so Python and the command line agree by construction;
this module only runs it and reads its --out file.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .record import PHASES

DEFAULT_BINARY = Path(__file__).resolve().parents[2] / "build" / "moesim"


class ProjectionError(ValueError):
    """`moesim project` refused its input; the message is the binary's."""


@dataclass
class Projection:
    attrs: dict
    steps: pd.DataFrame
    phases: pd.DataFrame
    traffic: pd.DataFrame
    node_traffic: pd.DataFrame
    expert_rows: pd.DataFrame
    shadowing: pd.DataFrame
    summary: str


def _binary(binary):
    if binary:
        return Path(binary)
    build = os.environ.get("MOESIM_BUILD")
    return Path(build) / "moesim" if build else DEFAULT_BINARY


def _matrix_frame(values, steps, names):
    """[S, A, B] -> long DataFrame step, names[0], names[1], bytes."""
    S, A, B = values.shape
    index = pd.MultiIndex.from_product([steps, range(A), range(B)], names=["step", *names])
    return pd.DataFrame({"bytes": values.reshape(-1)}, index=index).reset_index()


def read_projection(path) -> Projection:
    """A `moesim project --out` file as DataFrames."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        g = f["projection"]
        steps = g["step"][()]
        step_time, balanced = g["step_time_s"][()], g["balanced_step_time_s"][()]
        phase, balanced_phase = g["phase_s"][()], g["balanced_phase_s"][()]
        rank_bytes = g["dispatch_bytes"][()] if "dispatch_bytes" in g else None
        node_bytes = g["node_dispatch_bytes"][()]
        rows = g["expert_rows"][()]
        dropped = g["dropped_per_rank"][()] if "dropped_per_rank" in g else None
        shadowed = g["shadowed_rows"][()] if "shadowed_rows" in g else None
        mfu = g["mfu"][()]
    S, P, _ = phase.shape
    index = pd.MultiIndex.from_product([steps, range(P), PHASES], names=["step", "rank", "phase"])
    phases = pd.DataFrame({"seconds": phase.reshape(-1),
                           "balanced_seconds": balanced_phase.reshape(-1)}, index=index).reset_index()
    summary = pd.DataFrame({"step": steps, "step_time_s": step_time,
                            "balanced_step_time_s": balanced,
                            "imbalance_cost": step_time / balanced - 1.0, "mfu": mfu})
    traffic = (_matrix_frame(rank_bytes, steps, ("src", "dst")) if rank_bytes is not None
               else pd.DataFrame(columns=["step", "src", "dst", "bytes"]))
    node_traffic = _matrix_frame(node_bytes, steps, ("src_node", "dst_node"))
    L = rows.shape[1]
    index = pd.MultiIndex.from_product([steps, range(L), range(P)], names=["step", "layer", "rank"])
    # drops at each rank's experts: NaN when the record had no group drops (schema 8)
    drops = dropped.reshape(-1) if dropped is not None else np.full(rows.size, np.nan)
    expert_rows = pd.DataFrame({"rows": rows.reshape(-1), "dropped": drops},
                               index=index).reset_index()
    shadowing = pd.DataFrame(columns=["step", "layer", "rows"])
    if shadowed is not None:
        index = pd.MultiIndex.from_product([steps, range(L)], names=["step", "layer"])
        shadowing = pd.DataFrame({"rows": shadowed.reshape(-1)}, index=index).reset_index()
    return Projection(attrs, summary, phases, traffic, node_traffic, expert_rows, shadowing, "")


def project(run, cluster, world_size, ep=0, ranks_per_node=0, dispatcher="alltoall",
            overlap_chunks=0, capacity_factor=None, shadowing=False, shadow_min_rows=0,
            out=None, binary=None) -> Projection:
    """Replays the record `run` (a path, or a `Run` from load_run) on `cluster`
    (a CLUSTER.ini) with `world_size` virtual ranks: see `moesim project`.
    ep=0 means EP = world_size; ranks_per_node=0 the cluster's devices per node;
    capacity_factor re-applies capacity to a dropless record; shadowing plans
    expert shadows (shadow_min_rows 0 = the run's default). Raises
    ProjectionError with the binary's message on bad input."""
    path = getattr(run, "path", run)
    cmd = [str(_binary(binary)), "project", str(path), "--cluster", str(cluster),
           "--world-size", str(world_size), "--expert-model-parallel-size", str(ep),
           "--ranks-per-node", str(ranks_per_node), "--moe-token-dispatcher-type", dispatcher,
           "--moe-overlap-chunks", str(overlap_chunks)]
    if capacity_factor is not None:
        cmd += ["--moe-expert-capacity-factor", str(capacity_factor)]
    if shadowing:
        cmd += ["--moe-expert-shadowing", "1", "--moe-shadow-min-rows", str(shadow_min_rows)]
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out) if out else Path(tmp) / "projection.h5"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        result = subprocess.run([*cmd, "--out", str(target)], capture_output=True, text=True,
                                env=env, timeout=600)
        if result.returncode != 0:
            raise ProjectionError(result.stderr.strip().removeprefix("moesim: error: "))
        projection = read_projection(target)
    projection.summary = result.stdout
    return projection
