"""The analysis package (analysis/moesim_analysis) against docs/run-record.md.

1. load_run on synthetic records: every value written comes back in
   the right row of the right frame; config and attributes keep their types.
2. Every unreadable input is a RecordError naming the path and the fix.
3. load_runs concatenates over runs with run and config columns; summarize_runs.
4. Every plot returns a Figure and writes PNG and SVG.
5. Real runs of build/moesim, skipped unless it writes the schema the package
   reads (a newer one fails test_build_writes_the_schema_this_package_reads):
   the record's invariants, read through load_run; a P-rank run routes
   exactly like the 1-rank run with P times the micro-batch; a run still
   writing loads while it flushes, and after SIGKILL.
"""
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from moesim_run import (BUILD, clean_env, flags, record_schema_version, train_record,
                        write_synthetic_record)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
from moesim_analysis import (SCHEMA_VERSION, RecordError, load_run, load_runs,  # noqa: E402
                             plots, summarize_runs, varying_config_columns)

PHASES = ["attention", "router", "dispatch", "experts", "combine", "grad_allreduce",
          "optimizer", "other"]
SHAPE = {"steps": 5, "moe_layers": 2, "experts": 3, "ranks": 2, "evals": 2, "categories": 4}
BUILD_SCHEMA = record_schema_version()
NEEDS_MATCHING_BUILD = pytest.mark.skipif(
    BUILD_SCHEMA != SCHEMA_VERSION,
    reason=f"build/moesim writes run record schema {BUILD_SCHEMA} (`build/moesim --version`), "
           f"moesim_analysis reads {SCHEMA_VERSION}; " + (
               "update the package to the newer schema" if (BUILD_SCHEMA or 0) > SCHEMA_VERSION
               else f"`make build/moesim` once schema {SCHEMA_VERSION} lands"))


@pytest.fixture
def synthetic(tmp_path):
    path = tmp_path / "synthetic.h5"
    written = write_synthetic_record(path, **SHAPE)
    return path, written


def as_array(frame, index, column, shape):
    """A long frame's column back in the dataset's [index...] layout, by the
    index values rather than the row order."""
    values = frame.set_index(index)[column].sort_index()
    assert len(values) == math.prod(shape), (len(values), shape)
    return values.to_numpy().reshape(shape)


# ---- 1. load_run round trip ------------------------------------------------------------

def test_train_and_eval_frames_hold_the_written_series(synthetic):
    path, written = synthetic
    run = load_run(path)
    assert list(run.train.columns) == ["step", "loss", "aux_loss", "z_loss", "importance_loss",
                                       "load_loss", "lr", "grad_norm", "tokens_per_s",
                                       "step_time_s"]
    for column in run.train.columns:
        np.testing.assert_array_equal(run.train[column], written[f"train/{column}"], column)
    assert list(run.eval.columns) == ["step", "loss"]
    np.testing.assert_array_equal(run.eval["step"], written["eval/step"])
    np.testing.assert_array_equal(run.eval["loss"], written["eval/loss"])


def test_routing_frames_hold_every_step_layer_and_expert(synthetic):
    path, written = synthetic
    run = load_run(path)
    S, L, E = SHAPE["steps"], SHAPE["moe_layers"], SHAPE["experts"]
    steps = written["train/step"]
    assert list(run.routing.columns) == ["step", "layer", "expert", "tokens", "processed",
                                         "dropped", "importance", "mean_prob", "expert_bias"]
    assert sorted(run.routing["layer"].unique()) == list(range(L))  # MoE-layer indices
    for column, name in [("tokens", "tokens_per_expert"), ("processed", "processed_per_expert"),
                         ("dropped", "dropped_per_expert"), ("importance", "importance"),
                         ("mean_prob", "mean_prob"), ("expert_bias", "expert_bias")]:
        np.testing.assert_array_equal(
            as_array(run.routing, ["step", "layer", "expert"], column, (S, L, E)),
            written[f"routing/{name}"], column)
    row = run.routing[(run.routing.step == steps[3]) & (run.routing.layer == 1)
                      & (run.routing.expert == 2)]
    assert row["tokens"].item() == written["routing/tokens_per_expert"][3, 1, 2]
    assert list(run.routing_layers.columns) == ["step", "layer", "entropy", "load_cv",
                                                "max_over_mean_load", "unused_experts",
                                                "aux_loss", "z_loss", "importance_loss",
                                                "load_loss", "mean_abs_logit", "logsumexp_sq"]
    for column in run.routing_layers.columns[2:]:
        np.testing.assert_array_equal(
            as_array(run.routing_layers, ["step", "layer"], column, (S, L)),
            written[f"routing/{column}"], column)


def test_timing_and_traffic_frames_hold_every_rank(synthetic):
    path, written = synthetic
    run = load_run(path)
    S, P = SHAPE["steps"], SHAPE["ranks"]
    assert list(run.timing.columns) == ["step", "rank", "phase", "seconds"]
    assert list(dict.fromkeys(run.timing["phase"])) == PHASES
    for phase in PHASES:
        rows = run.timing[run.timing.phase == phase]
        np.testing.assert_array_equal(as_array(rows, ["step", "rank"], "seconds", (S, P)),
                                      written[f"timing/{phase}"], phase)
    assert list(run.traffic.columns) == ["step", "src", "dst", "bytes"]
    np.testing.assert_array_equal(as_array(run.traffic, ["step", "src", "dst"], "bytes",
                                           (S, P, P)), written["traffic/dispatch_bytes"])


def test_comm_timing_is_its_own_frame_and_never_a_phase(synthetic):
    """/timing/comm breaks phases down: summing it into the step would count
    the same seconds twice, so it is not in `timing` but in `comm_timing`."""
    path, written = synthetic
    run = load_run(path)
    S, P = SHAPE["steps"], SHAPE["ranks"]
    assert "comm" not in set(run.timing["phase"])
    comm = run.comm_timing
    names = [name for name in written if name.startswith("timing/comm/")]
    assert len(names) == 12
    for name in names:
        column = name[len("timing/comm/"):].replace("/", "_")
        np.testing.assert_array_equal(as_array(comm, ["step", "rank"], column, (S, P)),
                                      written[name], column)
    kinds = ("dispatch", "combine", "grad_reduce")
    for total in ("exposed", "in_flight"):
        expected = sum(written[f"timing/comm/{total}/{kind}"] for kind in kinds)
        np.testing.assert_array_equal(as_array(comm, ["step", "rank"], total, (S, P)), expected)
    np.testing.assert_array_equal(comm["hidden"], comm["in_flight"] - comm["exposed"])


def test_internode_frame_holds_every_node_pair(synthetic):
    path, written = synthetic
    run = load_run(path)
    assert list(run.internode.columns) == ["step", "src_node", "dst_node", "bytes"]
    np.testing.assert_array_equal(
        as_array(run.internode, ["step", "src_node", "dst_node"], "bytes", (SHAPE["steps"], 2, 2)),
        written["traffic/internode_bytes"])
    assert run.attrs["num_nodes"] == 2
    np.testing.assert_array_equal(run.attrs["node_of_rank"], [0, 1])


def test_shadowing_frame_holds_the_rows_of_every_step_and_layer(synthetic, tmp_path):
    path, written = synthetic
    run = load_run(path)
    assert list(run.shadowing.columns) == ["step", "layer", "rows"]
    np.testing.assert_array_equal(
        as_array(run.shadowing, ["step", "layer"], "rows", (SHAPE["steps"], SHAPE["moe_layers"])),
        written["traffic/shadowed_rows"])
    older = tmp_path / "schema9.h5"
    write_synthetic_record(older, **SHAPE, schema=9)
    assert load_run(older).shadowing.empty


def test_schema_6_record_loads_without_communication_frames(tmp_path):
    path = tmp_path / "schema6.h5"
    written = write_synthetic_record(path, **SHAPE, schema=6)
    run = load_run(path)
    assert run.comm_timing.empty and run.internode.empty
    assert list(dict.fromkeys(run.timing["phase"])) == PHASES
    np.testing.assert_array_equal(
        as_array(run.timing[run.timing.phase == "dispatch"], ["step", "rank"], "seconds",
                 (SHAPE["steps"], SHAPE["ranks"])), written["timing/dispatch"])


def test_specialization_frames_name_the_categories(synthetic):
    path, written = synthetic
    run = load_run(path)
    V, L, E, C = SHAPE["evals"], SHAPE["moe_layers"], SHAPE["experts"], SHAPE["categories"]
    names = written["attrs"]["category_names"]
    spec = run.specialization
    assert list(spec.columns) == ["eval_step", "layer", "expert", "category", "count"]
    assert list(dict.fromkeys(spec["category"])) == names
    counts = spec.assign(category=spec["category"].map(names.index))
    np.testing.assert_array_equal(
        as_array(counts, ["eval_step", "layer", "expert", "category"], "count", (V, L, E, C)),
        written["specialization/counts"])
    assert list(run.mutual_information.columns) == ["eval_step", "layer", "bits"]
    np.testing.assert_array_equal(
        as_array(run.mutual_information, ["eval_step", "layer"], "bits", (V, L)),
        written["specialization/mutual_information"])


def test_config_and_attributes_keep_their_types(synthetic):
    path, written = synthetic
    run = load_run(path)
    assert run.config["num_experts"] == SHAPE["experts"] and type(run.config["num_experts"]) is int
    assert run.config["moe_expert_capacity_factor"] == 1.25
    assert type(run.config["moe_expert_capacity_factor"]) is float
    assert run.config["data_path"] == "synthetic"
    assert not any(key.startswith("config.") for key in list(run.config) + list(run.attrs))
    assert run.attrs["schema_version"] == SCHEMA_VERSION
    assert run.attrs["hostnames"] == ["host0", "host1"]
    assert run.attrs["config"] == written["attrs"]["config"]
    np.testing.assert_array_equal(run.attrs["param_bytes_per_rank"], [4000, 4000])
    assert run.status == "complete" and run.path == path and run.name == "synthetic"


def test_a_record_without_categories_or_evaluations_loads_empty_tables(tmp_path):
    path = tmp_path / "bare.h5"
    write_synthetic_record(path, evals=0, categories=0)
    run = load_run(path)
    assert run.eval.empty and run.specialization.empty and run.mutual_information.empty
    assert len(run.train) == 6


# ---- 2. errors ----------------------------------------------------------------------------

def write_hdf5(path, attrs):
    with h5py.File(path, "w") as f:
        f["params/w"] = np.zeros(3)
        f.attrs.update(attrs)
    return path


def assert_record_error(source, *phrases, load=load_run):
    with pytest.raises(RecordError) as error:
        load(source)
    message = str(error.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    assert isinstance(error.value, ValueError)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.h5"
    assert_record_error(path, str(path), "no such file", "moesim train --out")


def test_directory_is_refused(tmp_path):
    assert_record_error(tmp_path, str(tmp_path), "is a directory", "load_runs")


def test_file_that_is_not_hdf5_is_named(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not an HDF5 file\n")
    assert_record_error(path, str(path), "not an HDF5 file", "moesim train --out")


def test_hdf5_file_without_schema_version_is_not_a_record(tmp_path):
    path = write_hdf5(tmp_path / "params.h5", {})
    assert_record_error(path, str(path), "not a moesim run record", "--save")
    path = write_hdf5(tmp_path / "half.h5", {"moesim_version": "0.1.0"})
    assert_record_error(path, str(path), "not a moesim run record")


def test_newer_schema_is_refused(tmp_path):
    newer = SCHEMA_VERSION + 1
    path = write_hdf5(tmp_path / "future.h5", {"schema_version": newer, "moesim_version": "9.0"})
    assert_record_error(path, str(path), f"schema {newer}",
                        f"newer than the schema {SCHEMA_VERSION}")


@pytest.mark.parametrize("older", range(1, 3))
def test_older_schema_asks_for_a_newer_moesim(older, tmp_path):
    path = write_hdf5(tmp_path / "old.h5", {"schema_version": older, "moesim_version": "0.1.0"})
    assert_record_error(path, str(path), f"schema {older}", "Re-run with a newer moesim")


def test_schema_3_record_loads_with_the_newer_columns_as_nan(tmp_path):
    """Schema 4 only added datasets: sweeps recorded before it stay readable."""
    path = tmp_path / "schema3.h5"
    written = write_synthetic_record(path, **SHAPE, schema=3)
    run = load_run(path)
    S, L, E = SHAPE["steps"], SHAPE["moe_layers"], SHAPE["experts"]
    assert run.attrs["schema_version"] == 3
    assert run.routing["expert_bias"].isna().all() and len(run.routing) == S * L * E
    for column in ("mean_abs_logit", "logsumexp_sq"):
        assert run.routing_layers[column].isna().all() and len(run.routing_layers) == S * L
    np.testing.assert_array_equal(
        as_array(run.routing, ["step", "layer", "expert"], "tokens", (S, L, E)),
        written["routing/tokens_per_expert"])


def test_missing_dataset_is_named(synthetic):
    path, _ = synthetic
    with h5py.File(path, "a") as f:
        del f["routing/importance"]
    assert_record_error(path, str(path), "/routing/importance is missing")


def test_series_of_unequal_length_are_refused(synthetic):
    path, _ = synthetic
    with h5py.File(path, "a") as f:
        f["train/loss"].resize((SHAPE["steps"] - 1,))
    assert_record_error(path, str(path), "/train/loss has 4 rows", "has 5")


def test_rows_of_a_flush_under_way_are_left_out(synthetic):
    """Series only grow: read after the step dataset, one may already hold
    the next flush's rows; the frames keep the steps read."""
    path, written = synthetic
    with h5py.File(path, "a") as f:
        f.attrs["status"] = "running"
        f["train/loss"].resize((SHAPE["steps"] + 1,))
        f["train/loss"][-1] = 123.0
    run = load_run(path)
    assert len(run.train) == SHAPE["steps"]
    assert 123.0 not in run.train["loss"].to_numpy()


def test_rows_past_the_steps_of_an_ended_run_are_damage(synthetic):
    """A closed record's series and steps were written by one final flush:
    extra rows there come from no flush under way, and are reported."""
    path, _ = synthetic
    with h5py.File(path, "a") as f:
        f["routing/entropy"].resize((SHAPE["steps"] + 1, SHAPE["moe_layers"]))
    assert_record_error(path, "/routing/entropy has", "the run that wrote it has ended",
                        "'complete'", "damaged")


def test_steps_allocated_but_not_written_are_a_torn_read(synthetic):
    path, _ = synthetic
    with h5py.File(path, "a") as f:
        f["train/step"].resize((SHAPE["steps"] + 1,))  # the new row reads as 0
    assert_record_error(path, "/train/step does not rise step by step")


def test_load_run_waits_out_torn_reads_of_a_flushing_run(synthetic, tmp_path):
    """A record whose series disagree is what a read across a live run's
    flush sees; load_run keeps reading for a while (once, 3 tries 0.05 s
    apart all overlapped flushes). Here the record heals after 0.5 s."""
    path, _ = synthetic
    healed = tmp_path / "healed.h5"
    healed.write_bytes(path.read_bytes())
    with h5py.File(path, "a") as f:
        f["train/loss"].resize((SHAPE["steps"] - 1,))
    timer = threading.Timer(0.5, os.replace, (healed, path))
    timer.start()
    try:
        run = load_run(path)
    finally:
        timer.join()
    assert len(run.train) == SHAPE["steps"]


def test_glob_matching_nothing_is_named(tmp_path):
    pattern = str(tmp_path / "sweep" / "*.h5")
    assert_record_error(pattern, pattern, "no run records match", load=load_runs)
    assert_record_error([], "empty list", load=load_runs)


# ---- 3. several runs ----------------------------------------------------------------------

@pytest.fixture
def sweep(tmp_path):
    """Three runs differing in capacity factor (two at 1.0), different lengths."""
    directory = tmp_path / "sweep"
    directory.mkdir()
    factors = {"cf1.0-a": 1.0, "cf1.0-b": 1.0, "cf2.0": 2.0}
    written = {name: write_synthetic_record(directory / f"{name}.h5", steps=4 + i, seed=i,
                                            config={"moe_expert_capacity_factor": factor})
               for i, (name, factor) in enumerate(factors.items())}
    return directory, written


def test_load_runs_concatenates_with_run_and_config_columns(sweep):
    directory, written = sweep
    runs = load_runs(str(directory / "*.h5"))
    assert [run.name for run in runs] == list(written)
    assert runs.train.columns[0] == "run"
    assert runs.train.groupby("run").size().to_dict() == {
        name: len(data["train/step"]) for name, data in written.items()}
    for name, data in written.items():
        rows = runs.routing[runs.routing.run == name]
        np.testing.assert_array_equal(rows["tokens"],
                                      data["routing/tokens_per_expert"].reshape(-1))
    factor = runs.eval.groupby("run")["moe_expert_capacity_factor"].first().to_dict()
    assert factor == {"cf1.0-a": 1.0, "cf1.0-b": 1.0, "cf2.0": 2.0}
    for table in ["eval", "routing", "routing_layers", "timing", "traffic", "specialization",
                  "mutual_information"]:
        frame = getattr(runs, table)
        assert {"run", "num_experts", "world_size", "ep_size"} <= set(frame.columns), table
    # `lr` is the step's learning rate; the configured peak becomes config_lr.
    assert "config_lr" in runs.train.columns and (runs.train["config_lr"] == 3e-3).all()
    np.testing.assert_array_equal(runs.train["lr"], np.concatenate(
        [data["train/lr"] for data in written.values()]))
    assert len(runs.config) == 3 and runs.config["status"].eq("complete").all()


def test_load_runs_takes_a_list_and_keeps_repeated_stems_apart(tmp_path):
    paths = []
    for sub in ["a", "b"]:
        (tmp_path / sub).mkdir()
        paths.append(tmp_path / sub / "run.h5")
        write_synthetic_record(paths[-1])
    runs = load_runs(paths)
    assert sorted(runs.train["run"].unique()) == ["a/run", "b/run"]
    assert [run.name for run in load_runs([str(paths[0])])] == ["run"]


def test_summary_has_one_row_per_run_with_the_swept_key(sweep):
    directory, written = sweep
    runs = load_runs(sorted(directory.glob("*.h5")))
    assert varying_config_columns(runs) == ["moe_expert_capacity_factor"]  # not `out`
    summary = summarize_runs(runs, final_window=3).set_index("run")
    for name, data in written.items():
        row = summary.loc[name]
        assert row["final_eval_loss"] == data["eval/loss"][-1]
        assert row["final_train_loss"] == pytest.approx(data["train/loss"][-3:].mean())
        assert row["tokens_per_s"] == pytest.approx(np.median(data["train/tokens_per_s"]))
        assert row["drop_rate"] == pytest.approx(data["routing/dropped_per_expert"].sum()
                                                 / data["routing/tokens_per_expert"].sum())
        assert row["steps"] == data["train/step"][-1]
    assert summary["moe_expert_capacity_factor"].to_dict() == {
        "cf1.0-a": 1.0, "cf1.0-b": 1.0, "cf2.0": 2.0}


# ---- 4. plots -----------------------------------------------------------------------------

SINGLE_RUN_PLOTS = [plots.expert_load_heatmap, plots.drop_rate_curves, plots.phase_time_breakdown,
                    plots.traffic_matrix, plots.specialization_heatmap,
                    plots.mutual_information_curves, plots.loss_curves, plots.router_logits]


def assert_saved(fig, tmp_path, make):
    for suffix, magic in [(".png", b"\x89PNG"), (".svg", b"<svg")]:
        path = tmp_path / "out" / f"figure{suffix}"
        assert make(path) is not None
        assert magic in path.read_bytes()[:400], f"{path} is not a {suffix} file"
        path.unlink()
    assert isinstance(fig, Figure) and fig.axes


@pytest.mark.parametrize("plot", SINGLE_RUN_PLOTS, ids=lambda f: f.__name__)
def test_single_run_plot_returns_figure_and_saves_png_and_svg(plot, synthetic, tmp_path):
    run = load_run(synthetic[0])
    assert_saved(plot(run), tmp_path, lambda path: plot(run, save=path))


@pytest.mark.parametrize("metric", ["final_eval_loss", "drop_rate", "tokens_per_s"])
def test_metric_vs_config_plots_one_point_per_run(metric, sweep, tmp_path):
    runs = load_runs(str(sweep[0] / "*.h5"))
    fig = plots.metric_vs_config(runs, "moe_expert_capacity_factor", metric)
    points = fig.axes[0].collections[0].get_offsets()
    summary = summarize_runs(runs)
    np.testing.assert_allclose(np.asarray(points)[:, 1], summary[metric])
    np.testing.assert_allclose(np.asarray(points)[:, 0], [1.0, 1.0, 2.0])
    assert_saved(fig, tmp_path, lambda path: plots.metric_vs_config(
        runs, "moe_expert_capacity_factor", metric, save=path))


def test_ratio_metrics_start_at_zero_and_name_their_units(sweep):
    runs = load_runs(str(sweep[0] / "*.h5"))
    for metric in plots.ZERO_BASED_METRICS:
        ax = plots.metric_vs_config(runs, "moe_expert_capacity_factor", metric).axes[0]
        assert ax.get_ylim()[0] == 0, f"{metric}: a cut axis exaggerates differences"
        assert ax.get_ylabel() == plots.METRIC_LABELS[metric] and "(" in ax.get_ylabel()
        assert ax.get_xlabel() == "moe_expert_capacity_factor" and ax.get_title()


def test_step_axes_tick_at_whole_steps(synthetic):
    run = load_run(synthetic[0])
    for fig in (plots.loss_curves(run), plots.drop_rate_curves(run), plots.router_logits(run),
                plots.mutual_information_curves(run, baseline_samples=5)):
        ax = next(ax for ax in fig.axes if ax.get_xlabel() == "step")
        ticks = ax.get_xticks()
        np.testing.assert_array_equal(ticks, np.round(ticks))


def test_loss_curves_overlay_runs(sweep):
    runs = load_runs(str(sweep[0] / "*.h5"))
    title = plots.loss_curves(runs).axes[0].get_title()
    assert title == f"{len(runs)} runs: train loss (lines) and validation loss (markers)"
    lines = plots.loss_curves(runs).axes[0].get_lines()
    assert len(lines) == 2 * len(runs)  # train and eval per run
    np.testing.assert_array_equal(lines[0].get_ydata(), runs.runs[0].train["loss"])
    np.testing.assert_array_equal(lines[1].get_ydata(), runs.runs[0].eval["loss"])


def test_expert_load_has_one_panel_per_moe_layer(synthetic):
    fig = plots.expert_load_heatmap(load_run(synthetic[0]))
    assert len(fig.axes) == SHAPE["moe_layers"] + 1  # plus the colorbar


def test_router_logits_draw_each_layer_of_both_statistics(synthetic):
    path, written = synthetic
    fig = plots.router_logits(load_run(path))
    for ax, name in zip(fig.axes, ("mean_abs_logit", "logsumexp_sq")):
        lines = ax.get_lines()
        assert len(lines) == SHAPE["moe_layers"]
        for layer, line in enumerate(lines):
            np.testing.assert_array_equal(line.get_ydata(), written[f"routing/{name}"][:, layer])


def test_specialization_heatmap_shows_log2_lift_centred_at_one(synthetic):
    run = load_run(synthetic[0])
    first = int(run.eval["step"].iloc[0])
    fig = plots.specialization_heatmap(run, eval_step=first, min_expected=0)
    at_first = run.specialization[run.specialization["eval_step"] == first]
    spec = at_first[at_first["layer"] == 0]
    counts = spec.pivot(index="expert", columns="category", values="count")
    # Columns in order of size over every layer, the same in every panel.
    sizes = at_first.groupby("category", sort=False)["count"].sum()
    order = sizes.sort_values(ascending=False, kind="stable").index
    counts = counts[order].to_numpy(dtype=float)
    share_of_expert = counts / counts.sum(axis=1, keepdims=True)
    lift = share_of_expert / (counts.sum(axis=0) / counts.sum())
    with np.errstate(divide="ignore"):
        expected = np.clip(np.log2(lift), -plots.MAX_LOG2_LIFT, plots.MAX_LOG2_LIFT)
    shown = fig.axes[0].images[0]
    np.testing.assert_allclose(np.ma.filled(shown.get_array(), np.nan), expected)
    assert shown.norm.vcenter == 0 and shown.norm.vmin == -shown.norm.vmax  # log2 1 = 0
    assert f"step {first}" in fig._suptitle.get_text()
    assert "random router" in fig.axes[0].get_title()
    xlabel = fig.axes[SHAPE["moe_layers"] - 1].get_xlabel()
    assert xlabel.startswith("data category (share of assignments)")
    assert "other" not in xlabel  # nothing folded at min_expected=0
    with pytest.raises(ValueError, match="no evaluation at step 7"):
        plots.specialization_heatmap(run, eval_step=7)


def test_expert_load_is_shown_as_log2_of_the_even_share(synthetic):
    run = load_run(synthetic[0])
    fig = plots.expert_load_heatmap(run)
    tokens = run.routing[run.routing["layer"] == 0].pivot(index="expert", columns="step",
                                                          values="tokens").to_numpy(dtype=float)
    with np.errstate(divide="ignore"):
        expected = np.clip(np.log2(tokens / tokens.mean(axis=0)), -plots.MAX_LOG2_LOAD,
                           plots.MAX_LOG2_LOAD)
    mesh = fig.axes[0].collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    assert mesh.norm.vcenter == 0


def test_lift_is_one_without_preference_and_small_categories_fold_into_other():
    # Expert 1 takes every "b" token; "c" and "d" are too small to estimate.
    counts = pd.DataFrame({"a": [60, 60], "b": [0, 40], "c": [3, 1], "d": [1, 2]},
                          index=pd.Index([0, 1], name="expert"))
    lift = plots.specialization_lift(counts, min_expected=10)
    assert list(lift.columns) == ["a", "b", "other"]  # by size, "other" last
    total, expert_totals = 167, np.array([64, 103])
    share_a = 120 / total
    np.testing.assert_allclose(lift["a"], (np.array([60, 60]) / expert_totals) / share_a)
    assert lift.loc[0, "b"] == 0 and lift.loc[1, "b"] == pytest.approx((40 / 103) / (40 / total))
    np.testing.assert_allclose(lift["other"], (np.array([4, 3]) / expert_totals) / (7 / total))
    # Categories without a single assignment (no validation text) make no empty "other".
    unseen = counts.assign(e=0, f=0)
    assert list(plots.specialization_lift(unseen, min_expected=10).columns) == \
        ["a", "b", "other"]
    assert list(plots.specialization_lift(unseen[["a", "b", "e", "f"]], min_expected=10)
                .columns) == ["a", "b"]
    even = pd.DataFrame({"a": [10, 20], "b": [30, 60]}, index=[0, 1])
    np.testing.assert_allclose(plots.specialization_lift(even, min_expected=0), 1.0)


def test_plot_arguments_are_checked(synthetic, sweep, tmp_path):
    run = load_run(synthetic[0])
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        plots.loss_curves(run, save=tmp_path / "loss.pdf")
    runs = load_runs(str(sweep[0] / "*.h5"))
    with pytest.raises(ValueError, match="no config column 'capacity'"):
        plots.metric_vs_config(runs, "capacity")
    with pytest.raises(ValueError, match="no metric 'speed'"):
        plots.metric_vs_config(runs, "moe_expert_capacity_factor", "speed")


# ---- 5. real runs -------------------------------------------------------------------------

SEQ, TOPK, EXPERTS, HIDDEN, GROUP = 16, 2, 4, 32, 32
SMALL = {
    "num-layers": 2, "hidden-size": HIDDEN, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": EXPERTS, "moe-router-topk": TOPK, "moe-ffn-hidden-size": 32,
    "ffn-hidden-size": 64, "train-iters": 20, "eval-interval": 10, "eval-iters": 1,
    "data-format": "synthetic", "synthetic-tokens": 20000, "micro-batch-size": 2,
    "progress-interval": 100,
}
# name: (ranks, extra options). "one-rank" uses the default routing group (one micro-batch).
REAL_LAYOUTS = {
    "one-rank": (1, {}),
    "one-rank-double-batch": (1, {"micro-batch-size": 4, "moe-group-size": GROUP}),
    "two-ranks": (2, {"moe-group-size": GROUP}),
    "four-ranks-ep2": (4, {"moe-group-size": GROUP, "expert-model-parallel-size": 2}),
    "one-rank-quad-batch": (1, {"micro-batch-size": 8, "moe-group-size": GROUP}),
}


def test_build_writes_the_schema_this_package_reads():
    """A newer moesim than the analysis would make every notebook refuse its
    records; the real-run tests below skip then, so this one says why."""
    if BUILD_SCHEMA is None or BUILD_SCHEMA < SCHEMA_VERSION:
        pytest.skip(f"build/moesim writes schema {BUILD_SCHEMA}, not yet {SCHEMA_VERSION}")
    assert BUILD_SCHEMA == SCHEMA_VERSION, (
        f"build/moesim writes run record schema {BUILD_SCHEMA} but moesim_analysis reads "
        f"{SCHEMA_VERSION}: update docs/run-record.md and analysis/ together with the writer")


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    if BUILD_SCHEMA != SCHEMA_VERSION:
        pytest.skip(f"build/moesim writes run record schema {BUILD_SCHEMA}")
    directory = tmp_path_factory.mktemp("real")
    runs = {}
    for name, (ranks, extra) in REAL_LAYOUTS.items():
        runs[name] = load_run(train_record({**SMALL, **extra, "out": directory / f"{name}.h5"},
                                           ranks))
    return runs


@pytest.fixture(params=list(REAL_LAYOUTS))
def real_run(request, real_runs):
    return real_runs[request.param]


def global_tokens(run):
    return run.config["micro_batch_size"] * run.config["seq_length"] * run.attrs["world_size"]


@NEEDS_MATCHING_BUILD
def test_real_record_is_complete(real_run):
    assert real_run.status == "complete"
    assert real_run.attrs["steps_done"] == real_run.config["train_iters"] == len(real_run.train)
    assert real_run.eval["step"].tolist() == [0, 10, 20]
    assert real_run.attrs["start_time"] and real_run.attrs["end_time"]
    assert real_run.attrs["end_time"] >= real_run.attrs["start_time"]  # ISO 8601 sorts as text
    assert len(real_run.attrs["hostnames"]) == real_run.attrs["world_size"]
    assert real_run.routing["layer"].max() == 1 and real_run.routing["expert"].max() == EXPERTS - 1
    assert set(real_run.timing["phase"]) == set(PHASES)


@NEEDS_MATCHING_BUILD
def test_real_assignments_sum_to_k_times_global_tokens(real_run):
    per_step_layer = real_run.routing.groupby(["step", "layer"])["tokens"].sum()
    assert (per_step_layer == TOPK * global_tokens(real_run)).all(), per_step_layer


@NEEDS_MATCHING_BUILD
def test_real_processed_plus_dropped_is_tokens_within_capacity(real_run, real_runs):
    routing, config = real_run.routing, real_run.config
    assert (routing["processed"] + routing["dropped"] == routing["tokens"]).all()
    group = config["moe_group_size"] or config["micro_batch_size"] * config["seq_length"]
    capacity = max(math.ceil(config["moe_expert_capacity_factor"] * group * TOPK / EXPERTS),
                   config["moe_min_capacity"])  # README: capacity has a floor
    groups = global_tokens(real_run) // group
    assert routing["processed"].max() <= capacity * groups, (capacity, groups)
    # Without a single drop anywhere the capacity bound would prove nothing.
    assert sum(run.routing["dropped"].sum() for run in real_runs.values()) > 0


@NEEDS_MATCHING_BUILD
def test_real_dispatch_bytes_are_processed_rows_inside_ep_groups(real_run):
    hidden, ep_size = real_run.config["hidden_size"], real_run.attrs["ep_size"]
    rows = real_run.routing.groupby("step")["processed"].sum()
    sent = real_run.traffic.groupby("step")["bytes"].sum()
    pd.testing.assert_series_equal(sent, rows * hidden * 4, check_names=False)
    traffic = real_run.traffic
    across = traffic[traffic["src"] // ep_size != traffic["dst"] // ep_size]
    assert (across["bytes"] == 0).all(), across[across["bytes"] != 0]


@NEEDS_MATCHING_BUILD
def test_real_derived_routing_statistics_follow_their_definitions(real_run):
    tokens = real_run.routing.pivot_table(index=["step", "layer"], columns="expert",
                                          values="tokens")
    processed = real_run.routing.pivot_table(index=["step", "layer"], columns="expert",
                                             values="processed")
    layers = real_run.routing_layers.set_index(["step", "layer"])
    mean = tokens.mean(axis=1)
    np.testing.assert_allclose(layers["load_cv"], tokens.std(axis=1, ddof=0) / mean, rtol=1e-9)
    np.testing.assert_allclose(layers["max_over_mean_load"], tokens.max(axis=1) / mean,
                               rtol=1e-9)
    np.testing.assert_array_equal(layers["unused_experts"], (processed == 0).sum(axis=1))
    mean_prob = real_run.routing.groupby(["step", "layer"])["mean_prob"].sum()
    np.testing.assert_allclose(mean_prob, 1.0, rtol=1e-5)


@NEEDS_MATCHING_BUILD
def test_real_mutual_information_follows_the_counts(real_run):
    for (eval_step, layer), rows in real_run.specialization.groupby(["eval_step", "layer"]):
        joint = rows.pivot(index="expert", columns="category", values="count").to_numpy()
        joint = joint / joint.sum()
        independent = np.outer(joint.sum(axis=1), joint.sum(axis=0))
        nonzero = joint > 0
        bits = (joint[nonzero] * np.log2(joint[nonzero] / independent[nonzero])).sum()
        recorded = real_run.mutual_information.set_index(["eval_step", "layer"])["bits"]
        assert recorded[(eval_step, layer)] == pytest.approx(bits, abs=1e-9)


ROUTE_KEYS = ["step", "layer", "expert"]


@NEEDS_MATCHING_BUILD
@pytest.mark.parametrize("parallel, single", [("two-ranks", "one-rank-double-batch"),
                                              ("four-ranks-ep2", "one-rank-quad-batch")])
def test_parallel_routing_equals_one_rank_with_the_whole_batch(parallel, single, real_runs):
    """Rank r trains on micro-batch r of the global batch, so with the same
    routing groups the P-rank run routes every token as the 1-rank run with P
    times the micro-batch does."""
    many, single = real_runs[parallel], real_runs[single]
    assert global_tokens(many) == global_tokens(single)
    exact = ROUTE_KEYS + ["tokens", "processed", "dropped"]
    pd.testing.assert_frame_equal(many.routing[exact], single.routing[exact])
    for frame, columns in [("routing", ["importance", "mean_prob"]),
                           ("routing_layers", list(many.routing_layers.columns[2:]))]:
        # Sums over ranks are reduced in another order: equal up to float rounding.
        pd.testing.assert_frame_equal(getattr(many, frame)[columns],
                                      getattr(single, frame)[columns], rtol=1e-5)


FLUSH_INTERVAL = 500
FLUSHES_WATCHED = 3
WAIT_FOR_FLUSHES_S = 30


def watch_flushes(path, proc):
    """load_run of a record being written, again and again until it holds
    FLUSHES_WATCHED flushes; once one load succeeds, every later one must
    (before that the file may not exist yet). Returns the runs."""
    deadline = time.monotonic() + WAIT_FOR_FLUSHES_S
    runs = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            runs.append(load_run(path))
        except RecordError:
            assert not runs, "a record that loaded once failed to load later"
        if runs and len(runs[-1].train) >= FLUSHES_WATCHED * FLUSH_INTERVAL:
            return runs
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {FLUSHES_WATCHED} flushes in "
                         f"{WAIT_FOR_FLUSHES_S} s (moesim exit status {proc.poll()})")


@NEEDS_MATCHING_BUILD
def test_record_of_a_running_then_killed_run_loads(tmp_path):
    """A run in progress holds its record open (and HDF5-locked) for writing;
    load_run still reads it while it flushes, and after SIGKILL the flushed
    steps remain."""
    out = tmp_path / "running.h5"
    options = {**SMALL, "train-iters": 10**6, "eval-interval": 10**6,
               "record-flush-interval": FLUSH_INTERVAL, "out": out}
    proc = subprocess.Popen([str(BUILD / "moesim"), "train", *flags(options)], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        running = watch_flushes(out, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    for run in running:
        assert run.status == "running" and run.attrs["end_time"] == ""
        assert len(run.train) % FLUSH_INTERVAL == 0, len(run.train)  # whole flushes only
    killed = load_run(out)
    assert killed.status == "running"
    assert len(killed.train) >= len(running[-1].train)
    assert len(killed.train) % FLUSH_INTERVAL == 0
    assert killed.attrs["steps_done"] == killed.train["step"].iloc[-1]


def test_a_torn_read_is_retried(synthetic, monkeypatch):
    """A read that meets a flush of the writing run fails inside HDF5; the next succeeds."""
    import moesim_analysis.record as record
    read_whole_file, attempts = record._run_from_file, []

    def flush_during_first_read(f, path):
        attempts.append(path)
        if len(attempts) == 1:
            raise OSError("Can't read data (addr overflow, addr = 30016, size = 2096)")
        return read_whole_file(f, path)

    monkeypatch.setattr(record, "_run_from_file", flush_during_first_read)
    assert load_run(synthetic[0]).status == "complete"
    assert len(attempts) == 2
