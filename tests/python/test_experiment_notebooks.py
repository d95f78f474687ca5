"""The experiment notebooks (analysis/notebooks/capacity_factor, scaling,
specialization) and the functions behind them (moesim_analysis.experiments).

Each notebook is executed headless with nbclient on the python3 kernel, as
tests/python/test_notebooks.py does, against a small sweep directory of real
build/moesim runs made here (tiny synthetic models, a few points each, laid
out and named as experiments/sweep lays out its output; the runner itself is
not used). A cell error fails the test, and every figure and table the
notebook promises must appear in MOESIM_FIGURES. The committed notebooks
carry no outputs.
"""
import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moesim_run import execute_notebook, read_clean_notebook, record_schema_version, train_record

REPO = Path(__file__).resolve().parents[2]
ANALYSIS = REPO / "analysis"
sys.path.insert(0, str(ANALYSIS))
from moesim_analysis import (PHASES, SCHEMA_VERSION, experiment_plots, experiments,  # noqa: E402
                             load_run, load_runs)

EXPERIMENT_NOTEBOOKS = ("capacity_factor.ipynb", "scaling.ipynb", "specialization.ipynb",
                       "switch_study.ipynb")
BUILD_SCHEMA = record_schema_version()
NEEDS_MATCHING_BUILD = pytest.mark.skipif(
    BUILD_SCHEMA != SCHEMA_VERSION,
    reason=f"build/moesim writes run record schema {BUILD_SCHEMA}, moesim_analysis reads "
           f"{SCHEMA_VERSION}; `make build/moesim`")

# Learns in 20 steps (validation loss falls at every evaluation), so a quality
# threshold is crossed where the test expects it.
TINY = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 32,
    "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64, "moe-router-topk": 2,
    "train-iters": 20, "lr": 1e-2, "lr-warmup-iters": 5, "eval-interval": 5, "eval-iters": 2,
    "data-path": "synthetic", "synthetic-tokens": 20000, "synthetic-clusters": 4,
    "micro-batch-size": 8, "progress-interval": 100,
}
# Points of experiments/sweeps/cf_sweep.ini in miniature, named as the runner names them.
CF_POINTS = {
    "switch_ecf0.5": {"moe-router-type": "switch", "moe-expert-capacity-factor": 0.5},
    "switch_ecf0": {"moe-router-type": "switch", "moe-expert-capacity-factor": 0},
    "topk_ecf1.0": {"moe-router-type": "topk", "moe-expert-capacity-factor": 1.0},
    "topk_ecf0": {"moe-router-type": "topk", "moe-expert-capacity-factor": 0},
    "dense_top2": {"moe-layer-freq": 1000, "ffn-hidden-size": 64},
}
CF_FIGURES = ("eval_loss_curves", "quality_vs_capacity_factor", "drop_rate_vs_capacity_factor",
              "tokens_per_s_vs_capacity_factor", "steps_to_threshold_vs_capacity_factor")
# (ranks, overrides) of scaling_weak.ini and scaling_strong.ini, 1 and 2 ranks only.
SCALING_POINTS = {
    "weak": {"ws1_ne2": (1, {"num-experts": 2}), "ws2_ne4": (2, {"num-experts": 4})},
    "strong": {"ws1_mbs4": (1, {"micro-batch-size": 4, "moe-group-size": 64}),
               "ws2_mbs2": (2, {"micro-batch-size": 2, "moe-group-size": 64})},
}
# Points of experiments/sweeps/switch_study.ini in miniature (dense FFN = k x expert width).
STUDY_POINTS = {
    "dense_ffn32": {"moe-layer-freq": 1000, "ffn-hidden-size": 32},
    "dense_ffn64": {"moe-layer-freq": 1000, "ffn-hidden-size": 64},
    "switch_e4": {"moe-router-type": "switch", "moe-expert-capacity-factor": 1.0},
    "switch_e4_reduced_init": {"moe-router-type": "switch", "init-method-std": 0.0063},
    "top2_e4": {"moe-router-type": "topk", "moe-router-topk": 2},
}
SPEC_POINTS = {
    "topk_synthetic": {"moe-router-type": "topk"},
    "switch_synthetic": {"moe-router-type": "switch"},
    "topk_fortunes": {"moe-router-type": "topk", "data-path": "/usr/share/games/fortunes"},
}


def train(out, options, ranks=1):
    """One tiny build/moesim run to `out`."""
    return train_record({**TINY, **options, "out": out}, ranks)


@pytest.fixture(scope="module")
def cf_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cf_sweep")
    for name, options in CF_POINTS.items():
        train(directory / f"{name}.h5", options)
    return directory


@pytest.fixture(scope="module")
def study_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("switch_study")
    for name, options in STUDY_POINTS.items():
        train(directory / f"{name}.h5", options)
    return directory


@pytest.fixture(scope="module")
def scaling_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scaling")
    for kind, points in SCALING_POINTS.items():
        (directory / kind).mkdir()
        for name, (ranks, options) in points.items():
            train(directory / kind / f"{name}.h5", {**options, "eval-interval": 1000}, ranks)
    return directory


@pytest.fixture(scope="module")
def specialization_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("specialization")
    for name, options in SPEC_POINTS.items():
        train(directory / f"{name}.h5", options)
    return directory


def assert_files(directory, names):
    missing = [name for name in names if not (directory / name).is_file()]
    assert not missing, f"not written to {directory}: {missing}; " \
                        f"found {sorted(p.name for p in directory.iterdir())}"


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells
                   if cell.cell_type == "code" for output in cell.outputs)


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the notebooks ---------------------------------------------------------------------

@NEEDS_MATCHING_BUILD
def test_capacity_factor_notebook_writes_figures_and_table1(cf_sweep, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    notebook = execute_notebook("capacity_factor.ipynb", monkeypatch, MOESIM_SWEEP=cf_sweep,
                       MOESIM_FIGURES=figures)
    assert_files(figures, [f"{name}.png" for name in CF_FIGURES]
                 + ["capacity_factor_table.csv", "switch_table1.csv", "switch_table1.md"])

    rows = read_csv_rows(figures / "switch_table1.csv")
    assert sorted(row["run"] for row in rows) == sorted(CF_POINTS)
    factor = {row["run"]: row["Capacity factor"] for row in rows}
    assert factor == {"switch_ecf0.5": "0.5", "switch_ecf0": "dropless", "topk_ecf1.0": "1",
                      "topk_ecf0": "dropless", "dense_top2": "-"}
    model = {row["run"]: row["Model"] for row in rows}
    assert model["switch_ecf0"] == "switch (top-1)" and model["topk_ecf0"] == "topk (top-2)"
    assert rows[0]["run"] == "dense_top2", "dense baseline first, as in Switch's Table 1"
    # The default threshold is the dense baseline's final loss: it reaches it at its end.
    dense_final = load_run(cf_sweep / "dense_top2.h5").eval["loss"].iloc[-1]
    steps_column = next(c for c in rows[0] if c.startswith("Steps to val loss"))
    assert steps_column == f"Steps to val loss {dense_final:.3f}"
    assert rows[0][steps_column] == str(TINY["train-iters"])
    assert next(r for r in rows if r["run"] == "topk_ecf0")["Drop rate"] == "0.00%"
    assert "dropless" in printed(notebook), "the table is not printed"
    markdown = (figures / "switch_table1.md").read_text().splitlines()
    assert markdown[0].startswith("| Model | Capacity factor |") and len(markdown) == 2 + len(rows)


@NEEDS_MATCHING_BUILD
def test_switch_study_notebook_draws_loss_against_steps_and_time(study_sweep, tmp_path,
                                                                monkeypatch):
    figures = tmp_path / "figures"
    notebook = execute_notebook("switch_study.ipynb", monkeypatch, MOESIM_SWEEP=study_sweep,
                                MOESIM_FIGURES=figures)
    assert_files(figures, ["switch_study_loss_vs_steps.png", "switch_study_loss_vs_time.png",
                           "switch_study_curves.csv", "switch_study_overtaking.csv",
                           "switch_study_overtaking.md"])
    curves = pd.read_csv(figures / "switch_study_curves.csv")
    evaluations = TINY["train-iters"] // TINY["eval-interval"] + 1  # step 0 included
    assert sorted(curves["run"].unique()) == sorted(STUDY_POINTS)
    assert (curves.groupby("run").size() == evaluations).all()
    for run, rows in curves.groupby("run"):
        assert rows["train_s"].iloc[0] == 0.0 and rows["train_s"].is_monotonic_increasing, run
        recorded = load_run(study_sweep / f"{run}.h5").train["step_time_s"].sum()
        assert rows["train_s"].iloc[-1] == pytest.approx(recorded), run
    table = pd.read_csv(figures / "switch_study_overtaking.csv").set_index("run")
    assert sorted(table.index) == ["switch_e4", "switch_e4_reduced_init", "top2_e4"]
    assert table.loc["switch_e4", "dense_run"] == "dense_ffn32"
    assert table.loc["top2_e4", "dense_run"] == "dense_ffn64"
    assert "overtakes_at_step" in printed(notebook)


@NEEDS_MATCHING_BUILD
def test_scaling_notebook_writes_efficiency_and_phase_breakdown(scaling_sweep, tmp_path,
                                                               monkeypatch):
    figures = tmp_path / "figures"
    execute_notebook("scaling.ipynb", monkeypatch, MOESIM_SWEEP=scaling_sweep, MOESIM_FIGURES=figures)
    assert_files(figures, ["scaling_efficiency.png", "phase_breakdown.png", "scaling_weak.csv",
                           "scaling_strong.csv", "phase_breakdown_weak.csv",
                           "phase_breakdown_strong.csv"])
    for kind in ("weak", "strong"):
        table = pd.read_csv(figures / f"scaling_{kind}.csv")
        assert table["world_size"].tolist() == [1, 2]
        assert table["efficiency"].iloc[0] == pytest.approx(1.0)
        assert (table["efficiency"] > 0).all()
    strong = pd.read_csv(figures / "scaling_strong.csv")
    assert strong["global_batch"].tolist() == [4, 4]
    phases = pd.read_csv(figures / "phase_breakdown_weak.csv", index_col=0)
    assert list(phases.columns) == [*experiments.PHASE_GROUPS, "step_s"]


@NEEDS_MATCHING_BUILD
def test_specialization_notebook_writes_heatmaps_and_mutual_information(
        specialization_sweep, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    execute_notebook("specialization.ipynb", monkeypatch, MOESIM_SWEEP=specialization_sweep,
            MOESIM_FIGURES=figures)
    assert_files(figures, [f"specialization_{name}.png" for name in SPEC_POINTS]
                 + ["mutual_information_vs_random.png", "mutual_information_vs_random.csv",
                    "mutual_information_final.csv"])
    final = pd.read_csv(figures / "mutual_information_final.csv")
    moe_layers = TINY["num-layers"]
    assert sorted(final["run"].unique()) == sorted(SPEC_POINTS)
    assert len(final) == len(SPEC_POINTS) * moe_layers
    assert (final["eval_step"] == TINY["train-iters"]).all()
    assert (final["random_bits"] > 0).all()
    assert (final["random_bits_q95"] >= final["random_bits"]).all()
    over_time = pd.read_csv(figures / "mutual_information_vs_random.csv")
    evaluations = TINY["train-iters"] // TINY["eval-interval"] + 1  # step 0 included
    assert len(over_time) == len(SPEC_POINTS) * moe_layers * evaluations


@pytest.mark.parametrize("notebook_name", EXPERIMENT_NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(notebook_name):
    notebook = read_clean_notebook(notebook_name)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and "MOESIM_SWEEP" in parameters[0].source


# ---- the functions behind them ---------------------------------------------------------

def test_models_are_told_apart_by_config():
    moe = {"num_layers": 4, "moe_layer_freq": 1, "moe_router_topk": 2, "ffn_hidden_size": 512,
           "moe_ffn_hidden_size": 256}
    assert experiments.model_label({**moe, "moe_router_type": "topk"}) == "topk (top-2)"
    assert experiments.model_label({**moe, "moe_router_type": "switch"}) == "switch (top-1)"
    dense = {**moe, "moe_layer_freq": 1000, "moe_router_type": "topk"}
    assert experiments.is_dense(dense) and not experiments.is_dense(moe)
    assert experiments.active_experts(dense) == 2
    assert experiments.model_label(dense) == "dense (FFN 512)"


def test_overtaking_is_the_first_evaluation_from_which_moe_stays_below_dense():
    def curve(run, losses, dense=False, k=1):
        return pd.DataFrame({"run": run, "model": run, "top_k": k, "dense": dense,
                             "step": [0, 10, 20, 30, 40], "loss": losses,
                             "train_s": [0.0, 1.0, 2.0, 3.0, 4.0]})
    curves = pd.concat([
        curve("dense1", [5.0, 4.0, 3.0, 2.5, 2.2], dense=True),
        curve("dense2", [5.0, 3.9, 2.9, 2.4, 2.1], dense=True, k=2),
        curve("late", [5.0, 3.5, 3.1, 2.4, 2.1]),     # below at 10, above at 20, below from 30
        curve("never", [5.0, 4.1, 3.1, 2.6, 2.3]),
        curve("top2", [5.0, 3.8, 2.8, 2.3, 2.05], k=2),
    ])
    table = experiments.overtaking_table(curves).set_index("run")
    assert table.loc["late", "overtakes_at_step"] == 30
    assert table.loc["late", "overtakes_at_train_s"] == 3.0
    assert table.loc["late", "gap"] == pytest.approx(-0.1)
    assert math.isnan(table.loc["never", "overtakes_at_step"])
    # step 0 ties (same start): from 10 on below
    assert table.loc["top2", "dense_run"] == "dense2"
    assert table.loc["top2", "overtakes_at_step"] == 10


def test_steps_to_threshold_is_the_first_evaluation_at_or_below_it():
    evaluation = pd.DataFrame({"step": [0, 25, 50, 75], "loss": [5.0, 3.0, 2.5, 2.6]})
    assert experiments.steps_to_threshold(evaluation, 2.6) == 50
    assert experiments.steps_to_threshold(evaluation, 3.0) == 25
    assert math.isnan(experiments.steps_to_threshold(evaluation, 2.0))


def test_dropless_gets_its_own_tick_right_of_the_largest_factor():
    positions, ticks, labels = experiments.capacity_positions([0.5, 1.0, 2.0, 0, 1.5])
    assert labels == ["0.5", "1", "1.5", "2", "dropless"]
    assert positions[0.0] == ticks[-1] > 2.0 and positions[1.5] == 1.5
    assert experiments.capacity_positions([1.0, 1.25])[2] == ["1", "1.25"]


def test_mutual_information_of_known_count_matrices():
    diagonal = np.diag([50, 50, 50, 50])
    assert experiments.mutual_information_bits(diagonal) == pytest.approx(2.0)
    assert experiments.mutual_information_bits(np.full((4, 3), 7)) == pytest.approx(0.0)
    assert experiments.mutual_information_bits(np.zeros((4, 3))) == 0.0
    stacked = experiments.mutual_information_bits(np.stack([diagonal, np.full((4, 4), 1)]))
    np.testing.assert_allclose(stacked, [2.0, 0.0], atol=1e-12)


def test_random_router_baseline_matches_independent_counts_and_not_specialised_ones():
    rng = np.random.default_rng(7)
    experts, categories, assignments = 8, 5, 4000
    marginal_e, marginal_c = rng.dirichlet(np.ones(experts)), rng.dirichlet(np.ones(categories))
    independent = rng.multinomial(assignments, np.outer(marginal_e, marginal_c).ravel())
    independent = independent.reshape(experts, categories)
    mean, q95 = experiments.random_router_mutual_information(independent, samples=300)
    bias = (experts - 1) * (categories - 1) / (2 * assignments * math.log(2))
    assert mean == pytest.approx(bias, rel=0.25)  # the finite-sample bias, not 0
    assert experiments.mutual_information_bits(independent) < 2 * q95
    specialised = np.zeros((experts, categories), dtype=np.int64)
    specialised[np.arange(experts), np.arange(experts) % categories] = assignments // experts
    mean, q95 = experiments.random_router_mutual_information(specialised)
    assert experiments.mutual_information_bits(specialised) > 50 * q95
    assert experiments.random_router_mutual_information(np.zeros((2, 2))) == (0.0, 0.0)


def test_random_router_baseline_keeps_loads_and_sizes_and_matches_the_analytic_bias():
    # Uneven loads and sizes, no preference: the permutation baseline's mean
    # is the finite-sample bias, and the observed MI sits inside its spread.
    experts, categories = 6, 4
    loads, sizes = np.array([500, 300, 800, 200, 700, 500]), np.array([1500, 900, 400, 200])
    counts = np.round(np.outer(loads, sizes) / sizes.sum()).astype(np.int64)
    assignments = counts.sum()
    mean, q95 = experiments.random_router_mutual_information(counts, samples=400, seed=3)
    bias = (experts - 1) * (categories - 1) / (2 * assignments * math.log(2))
    assert mean == pytest.approx(bias, rel=0.15)
    assert mean < q95 < 3 * mean
    # A router that keeps loads and sizes but sends category i to experts i, i+1
    # is far above it.
    specialised = np.zeros((experts, categories), dtype=np.int64)
    for category in range(categories):
        specialised[category, category] = specialised[category + 1, category] = 100
    assert experiments.mutual_information_bits(specialised) > 20 * \
        experiments.random_router_mutual_information(specialised, samples=100)[1]


@NEEDS_MATCHING_BUILD
def test_specialization_counts_and_mutual_information_match_the_record(specialization_sweep):
    run = load_run(specialization_sweep / "topk_fortunes.h5")
    counts, eval_steps, categories = experiments.specialization_counts(run)
    assert counts.shape == (len(eval_steps), TINY["num-layers"], TINY["num-experts"],
                            len(categories))
    assert eval_steps == list(range(0, TINY["train-iters"] + 1, TINY["eval-interval"]))
    recorded = run.mutual_information["bits"].to_numpy().reshape(counts.shape[:2])
    np.testing.assert_allclose(experiments.mutual_information_bits(counts), recorded,
                               atol=1e-9)
    frame = experiments.specialization_vs_random(run, samples=20)
    np.testing.assert_allclose(frame["excess_bits"], frame["bits"] - frame["random_bits"])


@NEEDS_MATCHING_BUILD
def test_capacity_factor_table_and_default_threshold(cf_sweep):
    runs = load_runs(str(cf_sweep / "*.h5"))
    threshold = experiments.default_threshold(runs)
    assert threshold == load_run(cf_sweep / "dense_top2.h5").eval["loss"].iloc[-1]
    table = experiments.capacity_factor_table(runs, threshold).set_index("run")
    assert table.loc["dense_top2", "steps_to_threshold"] == TINY["train-iters"]
    assert math.isnan(table.loc["dense_top2", "drop_rate"])  # no router, nothing to drop
    assert table.loc["topk_ecf0", "drop_rate"] == 0.0
    assert table.loc["switch_ecf0.5", "drop_rate"] > 0.0
    assert table.loc["switch_ecf0", "top_k"] == 1 and table.loc["topk_ecf0", "top_k"] == 2


@NEEDS_MATCHING_BUILD
def test_phase_groups_cover_every_phase_and_sum_to_the_step_time(scaling_sweep):
    assert sorted(p for group in experiments.PHASE_GROUPS.values() for p in group) == \
        sorted(PHASES)
    runs = load_runs(str(scaling_sweep / "strong" / "*.h5"))
    groups = experiments.phase_groups(runs, warmup_steps=0)
    assert groups.index.tolist() == [1, 2]
    step_time = runs.train.groupby("world_size")["step_time_s"].mean()
    # Phases are per-rank wall times and the step time is rank 0's; timers miss little.
    np.testing.assert_allclose(groups.sum(axis=1), step_time, rtol=0.2)
    weak = experiments.scaling_table(load_runs(str(scaling_sweep / "weak" / "*.h5")), "weak")
    np.testing.assert_allclose(weak["efficiency"],
                               weak["tokens_per_s_per_rank"] / weak["tokens_per_s_per_rank"][0])
    with pytest.raises(ValueError, match="weak.*strong"):
        experiments.scaling_table(runs, "medium")


# ---- the figures: titles, units, scales --------------------------------------------------

def capacity_table():
    """A capacity_factor_table in miniature: two MoE models at cf 1 and dropless, one dense."""
    return pd.DataFrame({
        "run": ["s1", "s0", "t1", "t0", "dense"],
        "model": ["switch (top-1)"] * 2 + ["topk (top-2)"] * 2 + ["dense (FFN 64)"],
        "dense": [False, False, False, False, True],
        "capacity_factor": [1.0, 0.0, 1.0, 0.0, np.nan],
        "quality": [5.40, 5.39, 5.41, 5.38, 5.43],
        "drop_rate": [0.1, 0.0, 0.05, 0.0, np.nan],
        "tokens_per_s": [95000.0, 90000.0, 80000.0, 78000.0, 100000.0],
        "steps_to_threshold": [15.0, 15.0, 20.0, 15.0, 20.0],
    })


def test_capacity_factor_figures_say_what_they_plot_and_start_ratios_at_zero():
    table = capacity_table()
    for metric in ("quality", *experiment_plots.ZERO_BASED_METRICS):
        ax = experiment_plots.capacity_factor_metric(table, metric, f"{metric} (unit)",
                                                     f"{metric} vs capacity factor").axes[0]
        assert ax.get_title() == f"{metric} vs capacity factor"
        assert ax.get_ylabel() == f"{metric} (unit)"
        assert ax.get_xlabel() == "capacity factor (training and evaluation)"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "dropless"]
        assert (ax.get_ylim()[0] == 0) == (metric != "quality"), metric
        assert ax.get_ylim()[1] > table[metric].max(), f"{metric}: the top line is cut"
    steps = experiment_plots.capacity_factor_metric(table, "steps_to_threshold", "steps", "")
    ticks = steps.axes[0].get_yticks()
    np.testing.assert_array_equal(ticks, np.round(ticks))
    runs = [SimpleNamespace(name=run, eval=pd.DataFrame({"step": [0, 5, 10, 15, 20],
                                                          "loss": [5.5, 5.48, 5.45, 5.43, q]}))
            for run, q in zip(table["run"], table["quality"])]
    fig = experiment_plots.capacity_factor_loss_curves(runs, table, 5.43)
    assert fig._suptitle.get_text() == "validation loss over training, per capacity factor"
    assert fig.axes[0].get_ylabel() == "validation loss (nats/token)"
    assert all(tick % 5 == 0 for tick in fig.axes[0].get_xticks()), "steps 0, 5, 10, ..."


def test_scaling_labels_stay_inside_the_axes_and_times_keep_three_digits():
    weak = pd.DataFrame({"world_size": [1, 2], "efficiency": [1.0, 0.02],
                         "speedup": [1.0, 0.04]})
    ax = experiment_plots.scaling_efficiency({"weak": weak}).axes[0]
    assert ax.get_ylabel() == "efficiency (1 = ideal)"
    low = ax.texts[1]
    assert low.get_text() == "2%\n(0.04x tokens/s)"
    assert low.xyann[1] > 0 and low.get_va() == "bottom", "a label below 2% crosses the x axis"
    assert experiment_plots.seconds_label(0.00231) == "2.31 ms"
    assert experiment_plots.seconds_label(0.0656) == "65.6 ms"
    assert experiment_plots.seconds_label(1.234) == "1.23 s"
    groups = pd.DataFrame({"compute": [0.0014, 0.0008], "dispatch + combine": [0.0001, 0.004]},
                          index=pd.Index([1, 2], name="world_size"))
    ax = experiment_plots.phase_group_bars({"strong": groups}).axes[0]
    assert [t.get_text() for t in ax.texts] == ["1.5 ms", "4.8 ms"]
    assert ax.get_ylabel() == "mean seconds per step (mean over ranks)"


def test_mutual_information_figure_names_the_baseline_and_its_band():
    frame = pd.DataFrame({"eval_step": [0, 5, 10] * 2, "layer": [0] * 3 + [1] * 3,
                          "bits": [0.01, 0.02, 0.03] * 2, "random_bits": [0.005] * 6,
                          "random_bits_q95": [0.009] * 6})
    fig = experiment_plots.mutual_information_vs_random({"a": frame, "b": frame})
    assert "random router" in fig._suptitle.get_text()
    assert "95th percentile" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert ax.get_title() == "a" and ax.get_ylabel() == "I(expert; category) (bits)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["layer 0", "layer 1", "random router (mean)",
                      "random router (to 95th pct)"]
    np.testing.assert_array_equal(ax.get_xticks(), np.round(ax.get_xticks()))


def test_precision_summary_compares_every_pairing_with_fp32(tmp_path):
    """experiments/precision_summary (make precision-study) on miniature
    records of three of its points: one row per run with its precisions and
    evaluations, fp32's own gap 0 and speed ratio 1, a bf16 run whose
    validation losses differ from fp32's, and the loss-curve figure."""
    points = {"fp32": {}, "bf16": {"precision": "bf16"},
              "fp32_router_bf16": {"moe-router-precision": "bf16"}}
    for name, extra in points.items():
        train_record({**TINY, **extra, "log-interval": 1, "out": tmp_path / f"{name}.h5"})
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "precision_summary"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| ") and "val@" not in line}
    assert set(rows) == set(points), result.stdout
    header = next(line for line in result.stdout.splitlines() if "val@" in line)
    assert [c.strip() for c in header.strip("|").split("|")][4:8] == \
        ["val@0", "val@5", "val@10", "val@15"], header
    assert rows["fp32"][1:3] == ["fp32", "fp32"] and rows["fp32"][-2:] == ["0.0000", "1.00"]
    assert rows["bf16"][1:3] == ["bf16", "fp32"] and float(rows["bf16"][-2]) > 0
    assert rows["fp32_router_bf16"][1:3] == ["fp32", "bf16"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
