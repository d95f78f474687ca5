"""plots: matplotlib figures of run records. Each function takes a Run (or
several), returns the Figure and, given save="name.png" or "name.svg", also
writes it there (the suffix picks the format).

Figures are built with matplotlib.figure.Figure rather than pyplot, so they
work under any backend (Agg on a cluster), stay out of pyplot's list of open
figures (no memory growth in loops), and show in Jupyter when displayed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

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
    fig = Figure(figsize=(PANEL_WIDTH_IN + 1, 4), layout="constrained")
    ax = fig.subplots()
    for index, run in enumerate(_as_runs(runs)):
        color = f"C{index % 10}"
        ax.plot(run.train["step"], run.train["loss"], color=color, alpha=0.6, linewidth=1,
                label=f"{run.name} train")
        ax.plot(run.eval["step"], run.eval["loss"], color=color, marker="o", linestyle="--",
                label=f"{run.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


def expert_load_heatmap(run: Run, save=None) -> Figure:
    """Router demand (tokens_per_expert, before capacity) of each expert per
    step, as a multiple of an even share so 1 means balanced whatever the
    batch size; one panel per MoE layer."""
    routing = run.routing
    layers = sorted(routing["layer"].unique())
    fig, axes = _layer_panels(len(layers), f"{run.name}: expert load (router demand)")
    load = routing.pivot_table(index=["layer", "expert"], columns="step", values="tokens")
    share = load / load.groupby(level="layer").transform("mean")
    vmax = max(float(np.nanmax(share.to_numpy())) if share.size else 1.0, 1.0)
    mesh = None
    for ax, layer in zip(axes, layers):
        panel = share.loc[layer]
        mesh = ax.pcolormesh(panel.columns, panel.index, panel.to_numpy(), shading="nearest",
                             cmap="viridis", vmin=0, vmax=vmax)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(panel.index)
    axes[-1].set_xlabel("step")
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), label="load / even share (1 = balanced)")
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
    image = ax.imshow(mean.to_numpy(), cmap="Blues", vmin=0)
    ax.set_xticks(range(len(mean.columns)), mean.columns)
    ax.set_yticks(range(len(mean.index)), mean.index)
    if len(mean) <= MAX_ANNOTATED_RANKS:
        for (src, dst), value in np.ndenumerate(mean.to_numpy()):
            ax.text(dst, src, _bytes_label(value), ha="center", va="center", fontsize="small",
                    color="white" if value > 0.6 * np.nanmax(mean.to_numpy()) else "black")
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    ax.set_title(f"{run.name}: dispatch traffic")
    fig.colorbar(image, ax=ax, label="mean bytes per step")
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


def specialization_heatmap(run: Run, eval_step=None, save=None) -> Figure:
    """Which data categories each expert gets at one evaluation (default the
    last): each expert's row is its assignments split by category, summing to 1."""
    eval_step = _chosen_eval_step(run, eval_step)
    spec = run.specialization[run.specialization["eval_step"] == eval_step]
    bits = run.mutual_information.set_index(["eval_step", "layer"])["bits"]
    categories = list(dict.fromkeys(spec["category"]))
    layers = sorted(spec["layer"].unique())
    fig = Figure(figsize=(max(5, 1.5 + 0.45 * len(categories)), 2.4 * len(layers) + 1),
                 layout="constrained")
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"{run.name}: expert specialisation at step {eval_step}")
    image = None
    for ax, layer in zip(axes, layers):
        counts = spec[spec["layer"] == layer].pivot(index="expert", columns="category",
                                                    values="count")[categories]
        totals = counts.sum(axis=1).replace(0, np.nan)  # an unused expert has no split
        image = ax.imshow(counts.div(totals, axis=0).to_numpy(), cmap="magma", vmin=0,
                          vmax=1, aspect="auto")
        ax.set_yticks(range(len(counts.index)), counts.index)
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: mutual information {bits.get((eval_step, layer), np.nan):.3f}"
                     f" bits", fontsize="medium")
    axes[-1].set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    axes[-1].set_xlabel("category")
    fig.colorbar(image, ax=list(axes), label="share of the expert's assignments")
    return _save(fig, save)


def mutual_information_curves(run: Run, save=None) -> Figure:
    """Mutual information between expert and category at each evaluation, per MoE layer."""
    fig = Figure(figsize=(PANEL_WIDTH_IN, 3.5), layout="constrained")
    ax = fig.subplots()
    for layer, rows in run.mutual_information.groupby("layer"):
        ax.plot(rows["eval_step"], rows["bits"], marker="o", label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("I(expert; category) (bits)")
    ax.set_title(f"{run.name}: expert-category mutual information")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, save)


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
    ax.scatter(positions, points[metric], zorder=3)
    means = points.assign(position=positions).groupby("position")[metric].mean()
    ax.plot(means.index, means.to_numpy(), color="gray", linewidth=1)
    for position, value, name in zip(positions, points[metric], points["run"]):
        ax.annotate(name, (position, value), fontsize="x-small", xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key}")
    ax.grid(alpha=0.3)
    return _save(fig, save)
