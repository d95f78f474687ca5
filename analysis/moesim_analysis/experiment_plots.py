"""experiment_plots: the figures of the experiment notebooks (capacity_factor,
scaling, specialization), drawn from the tables of `experiments`. Like
`plots`, each function returns a matplotlib Figure (built without pyplot) and,
given save="name.png" or "name.svg", also writes it there."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .experiments import capacity_positions
from .plots import PANEL_WIDTH_IN, _save, integer_steps

DENSE_STYLES = ("--", ":", "-.")
# capacity_factor_table columns whose ratio matters: their axis starts at 0.
ZERO_BASED_METRICS = ("tokens_per_s", "drop_rate", "steps_to_threshold")


def capacity_factor_metric(table: pd.DataFrame, metric: str, ylabel: str, title: str,
                           percent: bool = False, dense: bool = True, save=None) -> Figure:
    """`metric` (a capacity_factor_table column) against the capacity factor,
    one line per MoE model, dropless at its own labelled tick right of the
    largest factor; dense runs (when `dense`) as horizontal lines."""
    moe = table[~table["dense"]]
    positions, ticks, labels = capacity_positions(moe["capacity_factor"])
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, 4), layout="constrained")
    ax = fig.subplots()
    for index, (model, rows) in enumerate(moe.groupby("model", sort=False)):
        rows = rows.assign(x=rows["capacity_factor"].map(positions)).sort_values("x")
        finite = rows[rows["capacity_factor"] > 0]
        # unclipped: a 0 on an axis that starts at 0 shows a whole marker
        ax.plot(finite["x"], finite[metric], marker="o", color=f"C{index}", label=model,
                clip_on=False)
        dropless = rows[rows["capacity_factor"] == 0]
        ax.plot(dropless["x"], dropless[metric], marker="D", markersize=8, linestyle="none",
                color=f"C{index}", clip_on=False)
        if len(finite) and len(dropless):  # dotted: dropless is no point on the cf axis
            ax.plot([finite["x"].iloc[-1], dropless["x"].iloc[0]],
                    [finite[metric].iloc[-1], dropless[metric].iloc[0]], linestyle=":",
                    color=f"C{index}")
    if dense:
        for index, row in enumerate(table[table["dense"]].itertuples()):
            value = getattr(row, metric)
            if np.isfinite(value):
                ax.axhline(value, color="black", alpha=0.7,
                           linestyle=DENSE_STYLES[index % len(DENSE_STYLES)], label=row.model)
    if ticks:
        ax.set_xticks(ticks, labels)
        if labels[-1] == "dropless":
            ax.axvline((ticks[-1] + ticks[-2]) / 2 if len(ticks) > 1 else ticks[-1] - 0.25,
                       color="gray", linewidth=0.8, alpha=0.5)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if metric in ZERO_BASED_METRICS and ax.get_ylim()[1] > 0:
        # from 0, since a cut axis makes a 10% change look 2x; headroom for a dense line on top
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    if metric == "steps_to_threshold":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("capacity factor (training and evaluation)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


def capacity_factor_loss_curves(runs, table: pd.DataFrame, threshold: float,
                                save=None) -> Figure:
    """Validation loss over training, one panel per MoE model with a line per
    capacity factor (dropless darkest), the dense runs in every panel in
    black, and the quality threshold as a horizontal line."""
    by_name = {run.name: run for run in runs}
    moe, dense = table[~table["dense"]], table[table["dense"]]
    models = list(dict.fromkeys(moe["model"])) or ["dense"]
    fig = Figure(figsize=(PANEL_WIDTH_IN * len(models) * 0.8 + 1, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models), sharey=True, squeeze=False)[0])
    colors = colormaps["viridis_r"]
    fig.suptitle("validation loss over training, per capacity factor")
    for ax, model in zip(axes, models):
        rows = moe[moe["model"] == model]
        factors = rows["capacity_factor"].map(lambda cf: np.inf if cf == 0 else cf)
        rows = rows.assign(order=factors).sort_values("order")
        for index, row in enumerate(rows.itertuples()):
            evaluation = by_name[row.run].eval
            label = "dropless" if row.capacity_factor == 0 else f"cf {row.capacity_factor:g}"
            ax.plot(evaluation["step"], evaluation["loss"], marker=".", label=label,
                    color=colors(0.1 + 0.8 * index / max(len(rows) - 1, 1)))
        for index, row in enumerate(dense.itertuples()):
            evaluation = by_name[row.run].eval
            ax.plot(evaluation["step"], evaluation["loss"], color="black",
                    linestyle=DENSE_STYLES[index % len(DENSE_STYLES)], label=row.model)
        if np.isfinite(threshold):
            ax.axhline(threshold, color="red", linewidth=1, label=f"threshold {threshold:.3f}")
        ax.set_title(model)
        ax.set_xlabel("step")
        integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("validation loss (nats/token)")
    finals = table["quality"].to_numpy()
    if np.isfinite(finals).any():  # zoom on the part where the runs differ
        low, high = np.nanmin(finals), np.nanmax(finals)
        axes[0].set_ylim(low - 0.1 * max(high - low, 0.1), high + 4 * max(high - low, 0.1))
    return _save(fig, save)


def scaling_efficiency(tables: dict, save=None) -> Figure:
    """Efficiency against rank count, one panel per table of
    experiments.scaling_table ({'weak': ..., 'strong': ...}), with the ideal
    (1) as a line; each point is labelled with its efficiency and speedup."""
    fig = Figure(figsize=(4.2 * max(len(tables), 1) + 1, 4), layout="constrained")
    axes = fig.subplots(1, max(len(tables), 1), squeeze=False)[0]
    for index, (ax, (kind, table)) in enumerate(zip(axes, tables.items())):
        ax.plot(table["world_size"], table["efficiency"], marker="o", color=f"C{index}",
                label="efficiency")
        ax.axhline(1.0, color="gray", linestyle="--", label="ideal")
        for row in table.itertuples():
            low = row.efficiency < 0.3  # below the point the label would cross the x axis
            ax.annotate(f"{row.efficiency:.0%}\n({row.speedup:.2f}x tokens/s)",
                        (row.world_size, row.efficiency), xytext=(5, 4 if low else -4),
                        textcoords="offset points", fontsize="small",
                        va="bottom" if low else "top")
        ax.set_xticks(table["world_size"])
        ax.set_xlim(table["world_size"].min() - 0.3, table["world_size"].max() + 0.9)
        ax.set_ylim(0, max(1.15, table["efficiency"].max() + 0.1))
        ax.set_xlabel("ranks")
        ax.set_ylabel("efficiency (1 = ideal)")
        ax.set_title({"weak": "weak scaling: per-rank tokens/s / 1 rank's",
                      "strong": "strong scaling: speedup / ranks"}.get(kind, kind),
                     fontsize="medium")
        ax.legend(fontsize="small", loc="lower left")
        ax.grid(alpha=0.3)
    return _save(fig, save)


def seconds_label(seconds: float) -> str:
    """Three significant digits, in ms below a second ("0.002 s" hid 2.3 vs 1.6 ms)."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def phase_group_bars(groups: dict, save=None) -> Figure:
    """Stacked mean seconds per step of each phase group (columns of
    experiments.phase_groups) per rank count, one panel per entry of
    `groups` ({'weak': frame, 'strong': frame})."""
    fig = Figure(figsize=(4 * max(len(groups), 1) + 2.5, 4.5), layout="constrained")
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)[0]
    for ax, (kind, frame) in zip(axes, groups.items()):
        positions = np.arange(len(frame))
        bottom = np.zeros(len(frame))
        for index, group in enumerate(frame.columns):
            seconds = frame[group].to_numpy()
            ax.bar(positions, seconds, bottom=bottom, color=f"C{index}", label=group)
            bottom += seconds
        for position, total in zip(positions, bottom):
            ax.annotate(seconds_label(total), (position, total), ha="center", va="bottom",
                        fontsize="small")
        ax.set_xticks(positions, [str(ws) for ws in frame.index])
        ax.set_xlabel("ranks")
        ax.set_ylabel("mean seconds per step (mean over ranks)")
        ax.set_title(f"{kind}: where a step's time goes", fontsize="medium")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, save)


def mutual_information_vs_random(frames: dict, save=None) -> Figure:
    """Mutual information between expert and category over training, one
    panel per run ({run name: experiments.specialization_vs_random frame}):
    a solid line per MoE layer, the random-router baseline of that layer
    dashed in the same colour, with its 95th percentile shaded."""
    count = max(len(frames), 1)
    columns = min(count, 2)
    rows = -(-count // columns)
    fig = Figure(figsize=(PANEL_WIDTH_IN * columns, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    fig.suptitle("mutual information between expert and data category: measured (solid)\nvs "
                 "a random router with the same loads (dashed: mean, shaded: to its 95th "
                 "percentile)", fontsize="medium")
    for ax, (name, frame) in zip(axes, frames.items()):
        for layer, layer_rows in frame.groupby("layer"):
            color = f"C{layer % 10}"
            ax.plot(layer_rows["eval_step"], layer_rows["bits"], marker="o", markersize=3,
                    color=color, label=f"layer {layer}")
            ax.plot(layer_rows["eval_step"], layer_rows["random_bits"], linestyle="--",
                    color=color, alpha=0.8)
            ax.fill_between(layer_rows["eval_step"], 0, layer_rows["random_bits_q95"],
                            color=color, alpha=0.08)
        ax.plot([], [], linestyle="--", color="gray", label="random router (mean)")
        ax.fill_between([], [], color="gray", alpha=0.15, label="random router (to 95th pct)")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("step")
        integer_steps(ax)
        ax.set_ylabel("I(expert; category) (bits)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(frames):]:
        ax.set_visible(False)
    return _save(fig, save)


def study_loss_curves(curves: pd.DataFrame, x: str, save=None) -> Figure:
    """Validation loss against `x` ("step" or "train_s"), one panel per number
    of active experts (the dense run of equal active FLOPs in black), a line
    per run."""
    ks = sorted(curves["top_k"].unique())
    fig = Figure(figsize=(PANEL_WIDTH_IN * len(ks) * 0.9 + 1, 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ks), sharey=True, squeeze=False)[0])
    colors = colormaps["tab10"]
    for ax, k in zip(axes, ks):
        panel = curves[curves["top_k"] == k]
        for index, (run, rows) in enumerate(panel.groupby("run", sort=False)):
            dense = bool(rows["dense"].iloc[0])
            ax.plot(rows[x], rows["loss"], label=run, marker="" if dense else ".",
                    color="black" if dense else colors(index % 10),
                    linestyle="--" if dense else "-", linewidth=2 if dense else 1)
        ax.set_title(f"{k} active expert{'s' if k > 1 else ''} per token")
        ax.set_xlabel("step" if x == "step" else "training time (s, evaluations excluded)")
        if x == "step":
            integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("validation loss (nats/token)")
    finals = curves.groupby("run")["loss"].last().to_numpy()
    if np.isfinite(finals).any():
        low, high = np.nanmin(finals), np.nanmax(finals)
        axes[0].set_ylim(low - 0.1 * max(high - low, 0.1), high + 4 * max(high - low, 0.1))
    return _save(fig, save)
