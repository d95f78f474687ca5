"""plots: matplotlib figures of run records. Each function takes a Run (or
several), returns the Figure and, given save="name.png" or "name.svg", also
writes it there (the suffix picks the format).

Figures are built with matplotlib.figure.Figure rather than pyplot, so they
work under any backend (Agg on a cluster), stay out of pyplot's list of open
figures (no memory growth in loops), and show in Jupyter when displayed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, PercentFormatter

from . import experiments
from .record import Run
from .sweep import RunSet, summarize_runs

SAVE_FORMATS = {".png": "png", ".svg": "svg"}
PNG_DPI = 120
PANEL_WIDTH_IN, PANEL_HEIGHT_IN = 6.0, 2.2
MAX_ANNOTATED_RANKS = 8  # beyond this, numbers in traffic cells are unreadable


def _save(fig: Figure, save) -> Figure:
    if save is None:
        return fig
    save = Path(save)
    file_format = SAVE_FORMATS.get(save.suffix.lower())
    if file_format is None:
        raise ValueError(f"save={str(save)!r}: the file name must end in .png or .svg")
    save.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save, format=file_format, dpi=PNG_DPI, bbox_inches="tight")
    return fig


def integer_steps(ax) -> None:
    """Step axes tick at whole steps (no 2.5 on a 20-step run)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _as_runs(runs) -> list:
    if isinstance(runs, Run):
        return [runs]
    return list(runs)


def _layer_panels(count: int, title: str):
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, PANEL_HEIGHT_IN * max(count, 1) + 0.5),
                 layout="constrained")
    axes = fig.subplots(max(count, 1), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(title)
    return fig, axes


def loss_curves(runs, save=None) -> Figure:
    """Train loss per logged step (line) and eval loss (markers), one colour per run."""
    runs = _as_runs(runs)
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, 4), layout="constrained")
    ax = fig.subplots()
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        ax.plot(run.train["step"], run.train["loss"], color=color, alpha=0.6, linewidth=1,
                label=f"{run.name} train")
        ax.plot(run.eval["step"], run.eval["loss"], color=color, marker="o", linestyle="--",
                label=f"{run.name} eval")
    ax.set_xlabel("step")
    integer_steps(ax)
    ax.set_ylabel("cross-entropy (nats/token)")
    subject = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    ax.set_title(f"{subject}: train loss (lines) and validation loss (markers)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


def _ratio_colorbar(fig: Figure, mappable, axes, label: str, max_log2: int):
    """A colour bar of log2 values labelled as the ratios they stand for."""
    colorbar = fig.colorbar(mappable, ax=axes, label=label)
    ticks = np.arange(-max_log2, max_log2 + 1)
    colorbar.ax.yaxis.set_major_locator(FixedLocator(ticks))
    colorbar.ax.set_yticklabels([f"{2.0 ** t:g}" if t >= 0 else f"1/{2 ** -t:g}"
                                 for t in ticks])
    return colorbar


MAX_LOG2_LOAD = 3  # the load colour scale ends at 8x and 1/8 of an even share


def expert_load_heatmap(run: Run, save=None) -> Figure:
    """Router demand (tokens_per_expert, before capacity) of each expert per
    step, as a multiple of an even share so 1 means balanced whatever the
    batch size; one panel per MoE layer, on a diverging log scale centred at
    1 (red: over-loaded, blue: under-used; an unused expert shows as 1/8)."""
    routing = run.routing
    layers = sorted(routing["layer"].unique())
    fig, axes = _layer_panels(len(layers), f"{run.name}: expert load (router demand per step)")
    load = routing.pivot_table(index=["layer", "expert"], columns="step", values="tokens")
    share = load / load.groupby(level="layer").transform("mean")
    norm = TwoSlopeNorm(vcenter=0, vmin=-MAX_LOG2_LOAD, vmax=MAX_LOG2_LOAD)
    mesh = None
    for ax, layer in zip(axes, layers):
        panel = share.loc[layer]
        with np.errstate(divide="ignore"):
            log_share = np.clip(np.log2(panel.to_numpy(dtype=float)), -MAX_LOG2_LOAD,
                                MAX_LOG2_LOAD)
        mesh = ax.pcolormesh(panel.columns, panel.index, log_share, shading="nearest",
                             cmap="RdBu_r", norm=norm)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(panel.index)
    axes[-1].set_xlabel("step")
    if mesh is not None:
        _ratio_colorbar(fig, mesh, list(axes), "load / even share (1 = balanced)", MAX_LOG2_LOAD)
    return _save(fig, save)


def drop_rate_curves(run: Run, save=None) -> Figure:
    """Share of top-k assignments dropped by expert capacity, per MoE layer and over all layers."""
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, 4), layout="constrained")
    ax = fig.subplots()
    by_layer = run.routing.groupby(["step", "layer"])[["tokens", "dropped"]].sum()
    for layer, rows in by_layer.groupby(level="layer"):
        steps = rows.index.get_level_values("step")
        ax.plot(steps, rows["dropped"] / rows["tokens"], linewidth=1, label=f"layer {layer}")
    total = by_layer.groupby(level="step").sum()
    ax.plot(total.index, total["dropped"] / total["tokens"], color="black", linewidth=2,
            label="all layers")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("step")
    integer_steps(ax)
    ax.set_ylabel("dropped assignments")
    ax.set_title(f"{run.name}: drop rate")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


def router_logits(run: Run, save=None) -> Figure:
    """Size of the router logits per MoE layer over steps: mean |logit| and
    mean logsumexp^2 (what the z-loss penalises; log(E)^2 for a uniform
    router at zero). NaN, so empty, for records before schema 4."""
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, 2 * PANEL_HEIGHT_IN + 0.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for column, ax, label in [("mean_abs_logit", axes[0], "mean |logit|"),
                              ("logsumexp_sq", axes[1], "mean logsumexp²")]:
        for layer, rows in run.routing_layers.groupby("layer"):
            ax.plot(rows["step"], rows[column], linewidth=1, label=f"layer {layer}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{run.name}: router logits (z-loss coeff "
                      f"{run.config.get('moe_z_loss_coeff', '?')})")
    axes[0].legend(fontsize="small")
    axes[1].set_xlabel("step")
    integer_steps(axes[1])
    return _save(fig, save)


def phase_time_breakdown(run: Run, save=None) -> Figure:
    """Mean seconds per step in each phase, stacked per rank: a rank whose bar
    is taller, or whose dispatch/combine share is larger, is the straggler."""
    mean = run.timing.groupby(["rank", "phase"])["seconds"].mean().unstack("phase")
    phases = list(dict.fromkeys(run.timing["phase"]))  # load_run's order: as a step runs
    fig = Figure(figsize=(max(4, 1 + 0.8 * len(mean)), 4.5), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(mean))
    for index, phase in enumerate(phases):
        seconds = mean[phase].to_numpy()
        ax.bar(mean.index, seconds, bottom=bottom, color=f"C{index % 10}", label=phase)
        bottom += seconds
    ax.set_xticks(mean.index)
    ax.set_xlabel("rank")
    ax.set_ylabel("mean seconds per step")
    ax.set_title(f"{run.name}: time per phase")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, save)


def _bytes_label(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def traffic_matrix(run: Run, save=None) -> Figure:
    """Mean bytes per step that rank src dispatched to rank dst (self included)."""
    mean = run.traffic.groupby(["src", "dst"])["bytes"].mean().unstack("dst")
    fig = Figure(figsize=(5, 4.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mean.to_numpy() / 1e6, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(mean.columns)), mean.columns)
    ax.set_yticks(range(len(mean.index)), mean.index)
    if len(mean) <= MAX_ANNOTATED_RANKS:
        for (src, dst), value in np.ndenumerate(mean.to_numpy()):
            ax.text(dst, src, _bytes_label(value), ha="center", va="center", fontsize="small",
                    color="white" if value > 0.6 * np.nanmax(mean.to_numpy()) else "black")
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    ax.set_title(f"{run.name}: token rows dispatched per step", fontsize="medium")
    fig.colorbar(image, ax=ax, label="mean MB per step (forward dispatch)")
    return _save(fig, save)


def _chosen_eval_step(run: Run, eval_step):
    steps = sorted(run.specialization["eval_step"].unique())
    if not steps:
        raise ValueError(f"{run.path} has no specialisation counts (no evaluation, or data "
                         f"without categories)")
    if eval_step is None:
        return steps[-1]
    if eval_step not in steps:
        raise ValueError(f"{run.path} has no evaluation at step {eval_step}; it has {steps}")
    return eval_step


# A category with fewer assignments per expert than this, if it had no
# preference, gives lifts that are mostly noise: it is folded into "other".
MIN_EXPECTED_PER_EXPERT = 10
MAX_LOG2_LIFT = 3  # the colour scale ends at 8x and 1/8 of the category's share


def specialization_lift(counts: pd.DataFrame,
                        min_expected: float = MIN_EXPECTED_PER_EXPERT) -> pd.DataFrame:
    """Lift of an expert x category count table: the expert's share of a
    category over that category's share of all assignments (1 = no
    preference, 2 = twice as often as an expert ignoring the category).
    Columns are sorted by size; categories with fewer than `min_expected`
    assignments per expert are summed into "other". An unused expert's row is NaN."""
    counts = fold_small_categories(counts, min_expected)
    total = counts.to_numpy().sum()
    expert_totals = counts.sum(axis=1).replace(0, np.nan)
    category_share = counts.sum(axis=0) / total if total else counts.sum(axis=0) * np.nan
    return counts.div(expert_totals, axis=0).div(category_share.replace(0, np.nan), axis=1)


def fold_small_categories(counts: pd.DataFrame, min_expected: float) -> pd.DataFrame:
    """Columns sorted by size (largest first), those with fewer than
    `min_expected` assignments per expert (row) summed into a last "other"."""
    sizes = counts.sum(axis=0).sort_values(ascending=False, kind="stable")
    small = sizes.index[sizes < min_expected * len(counts.index)]
    kept = counts[[c for c in sizes.index if c not in set(small)]]
    other = counts[list(small)].sum(axis=1)
    if other.sum() == 0:  # no assignments at all (e.g. no validation text): nothing to show
        return kept
    return kept.assign(other=other)


def specialization_heatmap(run: Run, eval_step=None, save=None,
                           min_expected: float = MIN_EXPECTED_PER_EXPERT,
                           baseline_samples: int = 200) -> Figure:
    """Do experts prefer categories? At one evaluation (default the last),
    per MoE layer, each expert's lift for each category (its share of the
    category over the category's overall share; 1 = no preference) on a
    diverging log scale centred at 1. Categories are sorted by size and
    those with fewer than `min_expected` assignments per expert are folded
    into "other". Each panel's title gives the mutual information beside a
    random router's with the same expert loads and category sizes."""
    eval_step = _chosen_eval_step(run, eval_step)
    spec = run.specialization[run.specialization["eval_step"] == eval_step]
    bits = run.mutual_information.set_index(["eval_step", "layer"])["bits"]
    layers = sorted(spec["layer"].unique())
    order = list(dict.fromkeys(spec["category"]))
    tables = {layer: spec[spec["layer"] == layer].pivot(index="expert", columns="category",
                                                        values="count")[order]
              for layer in layers}
    # One set of columns for every panel: sizes over all layers.
    folded_all = fold_small_categories(sum(tables.values()), min_expected * len(layers))
    columns = list(folded_all.columns)
    shares = folded_all.sum(axis=0) / folded_all.to_numpy().sum()
    fig = Figure(figsize=(max(6, 2.5 + 0.42 * len(columns)), 2.2 * len(layers) + 1.6),
                 layout="constrained")
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"{run.name}: expert preference for data categories at step {eval_step}")
    norm = TwoSlopeNorm(vcenter=0, vmin=-MAX_LOG2_LIFT, vmax=MAX_LOG2_LIFT)
    image, unused_expert = None, False
    for ax, layer in zip(axes, layers):
        counts = tables[layer]
        lift = specialization_lift(counts, min_expected).reindex(columns=columns)
        with np.errstate(divide="ignore"):
            log_lift = np.log2(lift.to_numpy(dtype=float))
        log_lift = np.clip(log_lift, -MAX_LOG2_LIFT, MAX_LOG2_LIFT)  # 0 assignments: 1/8
        unused_expert |= bool(lift.isna().all(axis=1).any())
        image = ax.imshow(np.ma.masked_invalid(log_lift), cmap="RdBu_r", norm=norm,
                          aspect="auto")
        ax.set_facecolor("0.85")  # an unused expert
        ax.set_yticks(range(len(counts.index)), counts.index)
        ax.set_ylabel("expert")
        mean, q95 = experiments.random_router_mutual_information(
            counts.fillna(0).to_numpy(dtype=np.int64), baseline_samples, seed=layer)
        ax.set_title(f"layer {layer}: I(expert; category) "
                     f"{bits.get((eval_step, layer), np.nan):.3f} bits, random router "
                     f"{mean:.3f} (95%: {q95:.3f})", fontsize="medium")
    labels = [f"{name} ({share:.0%})" if share >= 0.01 else f"{name} ({share:.1%})"
              for name, share in shares.items()]
    axes[-1].set_xticks(range(len(columns)), labels, rotation=45, ha="right")
    notes = ["data category (share of assignments), largest first"]
    if "other" in columns:
        notes.append(f"\"other\": under {min_expected:g} assignments per expert")
    if unused_expert:
        notes.append("grey: expert unused")
    axes[-1].set_xlabel("; ".join(notes))
    _ratio_colorbar(fig, image, list(axes), "lift: expert's share of the category / "
                    "category's share (1 = no preference)", MAX_LOG2_LIFT)
    return _save(fig, save)


def mutual_information_curves(run: Run, save=None, baseline_samples: int = 200) -> Figure:
    """Mutual information between expert and category at each evaluation, per
    MoE layer (solid), beside a random router's with the same expert loads and
    category sizes (dashed: its mean, shaded: up to its 95th percentile): the
    gap is what the router learnt about the category."""
    frame = experiments.specialization_vs_random(run, baseline_samples)
    fig = Figure(figsize=(PANEL_WIDTH_IN, 3.5), layout="constrained")
    ax = fig.subplots()
    for layer, rows in frame.groupby("layer"):
        color = f"C{layer % 10}"
        ax.plot(rows["eval_step"], rows["bits"], marker="o", color=color, label=f"layer {layer}")
        ax.plot(rows["eval_step"], rows["random_bits"], linestyle="--", color=color, alpha=0.8)
        ax.fill_between(rows["eval_step"], 0, rows["random_bits_q95"], color=color, alpha=0.08)
    ax.plot([], [], linestyle="--", color="gray", label="random router, same loads")
    ax.set_xlabel("step")
    integer_steps(ax)
    ax.set_ylabel("I(expert; category) (bits)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{run.name}: expert-category mutual information vs a random router",
                 fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


# Axis labels with units for summarize_runs' metrics.
METRIC_LABELS = {
    "final_eval_loss": "final validation loss (nats/token)",
    "final_train_loss": "final train loss (nats/token, mean of the last 10 steps)",
    "tokens_per_s": "throughput (tokens/s, median over steps)",
    "drop_rate": "drop rate (share of assignments, whole run)",
}


# Quantities whose ratio matters: their axis starts at 0.
ZERO_BASED_METRICS = ("tokens_per_s", "drop_rate")


def metric_vs_config(runs: RunSet, key: str, metric: str = "final_eval_loss", save=None) -> Figure:
    """One point per run: a summarize_runs metric (final_eval_loss,
    final_train_loss, tokens_per_s, drop_rate) against a config column of the
    RunSet (e.g. moe_expert_capacity_factor). Runs sharing a value are joined
    by their mean."""
    if key not in runs.config.columns:
        raise ValueError(f"no config column {key!r}; the runs have {list(runs.config.columns)}")
    summary = summarize_runs(runs)
    if metric not in summary.columns:
        raise ValueError(f"no metric {metric!r}; choose from {list(summary.columns)}")
    points = summary[["run", metric]].merge(runs.config[["run", key]], on="run")
    numeric = np.issubdtype(points[key].dtype, np.number)
    positions = points[key] if numeric else points[key].astype(str)
    fig = Figure(figsize=(PANEL_WIDTH_IN, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(positions, points[metric], zorder=3, clip_on=False)  # whole marker at 0
    means = points.assign(position=positions).groupby("position")[metric].mean()
    ax.plot(means.index, means.to_numpy(), color="gray", linewidth=1)
    for position, value, name in zip(positions, points[metric], points["run"]):
        ax.annotate(name, (position, value), fontsize="x-small", xytext=(3, 3),
                    textcoords="offset points")
    label = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    if metric == "drop_rate":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if metric in ZERO_BASED_METRICS:  # a cut axis would make a 10% change look 2x
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 0))
    ax.margins(x=0.1)  # room for the run names right of the last point
    ax.set_title(f"{label.split(' (')[0]} vs {key}", fontsize="medium")
    ax.grid(alpha=0.3)
    return _save(fig, save)
