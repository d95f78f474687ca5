"""experiments: the numbers behind the experiment notebooks (capacity_factor, switch_study,
scaling, specialization in analysis/notebooks), computed from the RunSet of a
sweep (experiments/sweeps/*.ini) or from one Run.

- capacity factor (Switch Transformer Table 1): `capacity_factor_table`, one
  row per run with model, capacity factor, quality, steps to a quality
  threshold, tokens/s and drop rate; `switch_table` puts it in Table 1's form.
- Switch study: `study_curves` (validation loss against steps and training
  time) and `overtaking_table` (when each MoE run gets and stays below the
  dense run of equal active FLOPs).
- scaling: `scaling_table` (throughput, speedup and efficiency per rank count)
  and `phase_groups` (where a step's time goes).
- specialisation: `mutual_information_bits` and the random-router baseline
  `random_router_mutual_information`; `specialization_vs_random` per layer
  and evaluation of one run.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .record import Run
from .sweep import RunSet, _run_set

DROPLESS_LABEL = "dropless"

# ---- models of a sweep -----------------------------------------------------------------


def is_dense(config: dict) -> bool:
    """No MoE layer: layer l is MoE when (l+1) % moe_layer_freq == 0, so a
    frequency above the layer count leaves every FFN dense."""
    return int(config.get("moe_layer_freq", 1)) > int(config.get("num_layers", 0))


def active_experts(config: dict) -> int:
    """Experts each token passes through: the switch router is top-1 whatever
    moe_router_topk says. For a dense model, its FFN width in expert widths
    (the MoE model of equal active FLOPs per token)."""
    if is_dense(config):
        return max(1, round(config["ffn_hidden_size"] / config["moe_ffn_hidden_size"]))
    return 1 if config.get("moe_router_type") == "switch" else int(config["moe_router_topk"])


def model_label(config: dict) -> str:
    """'switch (top-1)', 'topk (top-2)', ... or 'dense (FFN 512)'."""
    if is_dense(config):
        return f"dense (FFN {config['ffn_hidden_size']})"
    return f"{config.get('moe_router_type', 'topk')} (top-{active_experts(config)})"


def steps_to_threshold(evaluation: pd.DataFrame, threshold: float) -> float:
    """The first evaluated step whose validation loss is at or below
    `threshold` (so resolved to --eval-interval), NaN if none is."""
    reached = evaluation.loc[evaluation["loss"] <= threshold, "step"]
    return float(reached.min()) if len(reached) else math.nan


def complete_runs(runs: RunSet) -> tuple:
    """(RunSet of the complete records, names of the others): a record still
    running, killed or failed holds no final quality to compare."""
    complete = [run for run in runs if run.status == "complete"]
    others = [f"{run.name} ({run.status})" for run in runs if run.status != "complete"]
    return (_run_set(complete) if complete else None), others


# ---- capacity factor -------------------------------------------------------------------

def _drop_rate(run: Run) -> float:
    if is_dense(run.config):
        return math.nan  # no router; moesim still writes one routing layer of unset values
    tokens = run.routing["tokens"].sum()
    return run.routing["dropped"].sum() / tokens if tokens else math.nan


def default_threshold(runs: RunSet) -> float:
    """The quality threshold when none is given: the best final validation
    loss of the dense baselines, so steps to threshold is "steps to match the
    dense model"; without a dense run, the median final validation loss."""
    finals = {run.name: run.eval["loss"].iloc[-1] for run in runs if len(run.eval)}
    dense = [finals[run.name] for run in runs if run.name in finals and is_dense(run.config)]
    if dense:
        return float(min(dense))
    return float(np.median(list(finals.values()))) if finals else math.nan


def capacity_factor_table(runs: RunSet, threshold: float) -> pd.DataFrame:
    """One row per run, dense runs first (as in Switch's Table 1), then MoE
    runs by top-k, router and capacity factor (dropless last): run, model, router, top_k, dense, capacity_factor (0 = dropless,
    NaN for dense), quality (final validation loss), quality_step (its step),
    steps_to_threshold, tokens_per_s (median over logged steps), drop_rate
    (dropped / routed assignments over the run, NaN for dense)."""
    rows = []
    for run in runs:
        dense = is_dense(run.config)
        rows.append({
            "run": run.name,
            "model": model_label(run.config),
            "router": "dense" if dense else run.config.get("moe_router_type", "topk"),
            "top_k": active_experts(run.config),
            "dense": dense,
            "capacity_factor": math.nan if dense else
            float(run.config["moe_expert_capacity_factor"]),
            "quality": run.eval["loss"].iloc[-1] if len(run.eval) else math.nan,
            "quality_step": int(run.eval["step"].iloc[-1]) if len(run.eval) else 0,
            "steps_to_threshold": steps_to_threshold(run.eval, threshold),
            "tokens_per_s": run.train["tokens_per_s"].median(),
            "drop_rate": _drop_rate(run),
        })
    table = pd.DataFrame(rows)
    order = table["capacity_factor"].map(lambda cf: math.inf if cf == 0 else cf)
    return (table.assign(_moe=~table["dense"], _order=order)
            .sort_values(["_moe", "top_k", "router", "_order"], ignore_index=True)
            .drop(columns=["_moe", "_order"]))


def capacity_positions(capacity_factors) -> tuple:
    """x positions for capacity factors with dropless (0) placed one tick
    step right of the largest finite factor: (position per factor as a dict,
    tick positions, tick labels)."""
    finite = sorted({float(cf) for cf in capacity_factors if cf > 0 and np.isfinite(cf)})
    steps = np.diff(finite)
    gap = float(np.median(steps)) if len(steps) else 0.5
    dropless_at = (finite[-1] if finite else 0.0) + max(gap, 0.25)
    positions = {cf: cf for cf in finite}
    ticks, labels = list(finite), [f"{cf:g}" for cf in finite]
    if any(cf == 0 for cf in capacity_factors):
        positions[0.0] = dropless_at
        ticks.append(dropless_at)
        labels.append(DROPLESS_LABEL)
    return positions, ticks, labels


def switch_table(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """capacity_factor_table in the form of Switch Transformer's Table 1:
    model, capacity factor (dropless for 0, '-' for dense), quality (headed
    with the step count when every run has the same), steps to the threshold
    ('not reached' when never), tokens/s, drop rate, run."""
    steps = table["quality_step"].unique()
    quality = (f"Quality after {steps[0]} steps" if len(steps) == 1 else "Final quality") + \
        " (val loss, nats/token)"
    return pd.DataFrame({
        "Model": table["model"],
        "Capacity factor": [("-" if dense else DROPLESS_LABEL if cf == 0 else f"{cf:g}")
                            for cf, dense in zip(table["capacity_factor"], table["dense"])],
        quality: table["quality"].round(4),
        f"Steps to val loss {threshold:.3f}": [
            "not reached" if np.isnan(s) else str(int(s)) for s in table["steps_to_threshold"]],
        "Speed (tokens/s)": table["tokens_per_s"].round(0).astype(int),
        "Drop rate": ["-" if np.isnan(d) else f"{100 * d:.2f}%" for d in table["drop_rate"]],
        "run": table["run"],
    })


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of the frame (no index)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row]
                                                  for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
    return "\n".join(lines) + "\n"


# ---- scaling ---------------------------------------------------------------------------

# Phases of docs/run-record.md in the groups of the scaling figure.
PHASE_GROUPS = {
    "compute (attention, router, experts)": ("attention", "router", "experts"),
    "dispatch + combine": ("dispatch", "combine"),
    "grad_allreduce": ("grad_allreduce",),
    "other (optimizer, embeddings, loss, data)": ("optimizer", "other"),
}
WARMUP_STEPS = 5  # first steps: page faults, buffer growth, MPI connection set-up


def _steady(frame: pd.DataFrame, warmup_steps: int) -> pd.DataFrame:
    """Rows after the first `warmup_steps` steps, unless that leaves none."""
    later = frame[frame["step"] > warmup_steps]
    return later if len(later) else frame


def scaling_table(runs: RunSet, kind: str, warmup_steps: int = WARMUP_STEPS) -> pd.DataFrame:
    """One row per run, by rank count: run, world_size, num_experts,
    micro_batch_size, global_batch (sequences), step_time_s and tokens_per_s
    (medians over the steps after warm-up), tokens_per_s_per_rank, speedup
    (tokens/s over the smallest rank count's) and efficiency: for kind
    'weak' (fixed work per rank) per-rank throughput over the smallest rank
    count's; for 'strong' (fixed global batch) speedup / rank ratio."""
    if kind not in ("weak", "strong"):
        raise ValueError(f"kind={kind!r}: choose 'weak' or 'strong'")
    rows = []
    for run in runs:
        train = _steady(run.train, warmup_steps)
        world = int(run.attrs["world_size"])
        rows.append({"run": run.name, "world_size": world,
                     "num_experts": run.config.get("num_experts"),
                     "micro_batch_size": run.config.get("micro_batch_size"),
                     "global_batch": world * int(run.config.get("micro_batch_size", 0)),
                     "step_time_s": train["step_time_s"].median(),
                     "tokens_per_s": train["tokens_per_s"].median()})
    table = pd.DataFrame(rows).sort_values("world_size", ignore_index=True)
    table["tokens_per_s_per_rank"] = table["tokens_per_s"] / table["world_size"]
    base = table.iloc[0]
    table["speedup"] = table["tokens_per_s"] / base["tokens_per_s"]
    ranks = table["world_size"] / base["world_size"]
    table["efficiency"] = (table["tokens_per_s_per_rank"] / base["tokens_per_s_per_rank"]
                           if kind == "weak" else table["speedup"] / ranks)
    return table


def phase_groups(runs: RunSet, warmup_steps: int = WARMUP_STEPS) -> pd.DataFrame:
    """Mean seconds per step (over the steps after warm-up and over ranks) of
    each PHASE_GROUPS group, one row per run indexed by world_size; the
    groups sum to the mean step time of a rank."""
    timing = _steady(runs.timing, warmup_steps)
    per_phase = timing.groupby(["world_size", "phase"])["seconds"].mean().unstack("phase")
    groups = pd.DataFrame({group: per_phase[[p for p in phases if p in per_phase]].sum(axis=1)
                           for group, phases in PHASE_GROUPS.items()})
    return groups.sort_index()


# ---- specialisation --------------------------------------------------------------------

def mutual_information_bits(counts) -> np.ndarray:
    """I(expert; category) in bits of count matrices [..., E, Cat] under the
    joint distribution counts / counts.sum() (as the record's
    /specialization/mutual_information); 0 for an all-zero matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=(-2, -1), keepdims=True)
    joint = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    p_expert = joint.sum(axis=-1, keepdims=True)
    p_category = joint.sum(axis=-2, keepdims=True)
    independent = p_expert * p_category
    ratio = np.divide(joint, independent, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log2(ratio)).sum(axis=(-2, -1))


def random_router_mutual_information(counts, samples: int = 200, seed: int = 0,
                                     quantile: float = 0.95) -> tuple:
    """The mutual information a router ignoring the category would show with
    exactly the same expert loads and category sizes as `counts` [E, Cat]:
    `samples` random pairings of the same assignments' experts and categories
    (a permutation test), so the finite-sample bias (about
    (E-1)(Cat-1) / (2 N ln 2) bits for N assignments) is included.
    Returns (mean, `quantile`) of their mutual information in bits."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return 0.0, 0.0
    experts, categories = counts.shape
    expert_of = np.repeat(np.arange(experts), counts.sum(axis=1))
    category_of = np.repeat(np.arange(categories), counts.sum(axis=0))
    rng = np.random.default_rng(seed)
    drawn = np.empty((samples, experts, categories), dtype=np.int64)
    for sample in range(samples):
        cell = expert_of * categories + rng.permutation(category_of)
        drawn[sample] = np.bincount(cell, minlength=experts * categories).reshape(
            experts, categories)
    bits = mutual_information_bits(drawn)
    return float(bits.mean()), float(np.quantile(bits, quantile))


def specialization_counts(run: Run) -> tuple:
    """The run's /specialization/counts back as an array [V, L, E, Cat] with
    (eval_steps, categories)."""
    spec = run.specialization
    eval_steps = list(dict.fromkeys(spec["eval_step"]))
    categories = list(dict.fromkeys(spec["category"]))
    layers, experts = spec["layer"].nunique(), spec["expert"].nunique()
    counts = (spec.set_index(["eval_step", "layer", "expert", "category"])["count"]
              .unstack("category")[categories]
              .reindex(pd.MultiIndex.from_product(
                  [eval_steps, range(layers), range(experts)])).to_numpy())
    return counts.reshape(len(eval_steps), layers, experts, len(categories)), eval_steps, \
        categories


def specialization_vs_random(run: Run, samples: int = 200, seed: int = 0) -> pd.DataFrame:
    """Per evaluation and MoE layer: bits (the record's mutual information),
    random_bits and random_bits_q95 (mean and 95th percentile of the
    random-router baseline), excess_bits = bits - random_bits, assignments."""
    if run.specialization.empty:
        return pd.DataFrame(columns=["eval_step", "layer", "bits", "random_bits",
                                     "random_bits_q95", "excess_bits", "assignments"])
    counts, eval_steps, _ = specialization_counts(run)
    recorded = run.mutual_information.set_index(["eval_step", "layer"])["bits"]
    rows = []
    for v, step in enumerate(eval_steps):
        for layer in range(counts.shape[1]):
            mean, q95 = random_router_mutual_information(counts[v, layer], samples,
                                                         seed=seed + 1000 * v + layer)
            bits = recorded.get((step, layer), mutual_information_bits(counts[v, layer]))
            rows.append({"eval_step": step, "layer": layer, "bits": bits,
                         "random_bits": mean, "random_bits_q95": q95,
                         "excess_bits": bits - mean,
                         "assignments": int(counts[v, layer].sum())})
    return pd.DataFrame(rows)


# ---- Switch study (make switch-study) --------------------------------------------------

def study_curves(runs: RunSet) -> pd.DataFrame:
    """Validation loss against steps and against training wall-clock time:
    run, model, top_k, dense, step, loss, train_s (the summed step times of
    steps 1..step, evaluations excluded, so runs interrupted by different
    evaluation loads compare fairly). One row per evaluation."""
    frames = []
    for run in runs:
        steps = run.train[["step", "step_time_s"]].sort_values("step")
        elapsed = pd.Series(steps["step_time_s"].cumsum().to_numpy(), index=steps["step"])
        evaluation = run.eval.sort_values("step")
        train_s = [float(elapsed.loc[:step].iloc[-1]) if step > 0 and len(elapsed.loc[:step])
                   else 0.0 for step in evaluation["step"]]
        frames.append(pd.DataFrame({
            "run": run.name, "model": model_label(run.config),
            "top_k": active_experts(run.config), "dense": is_dense(run.config),
            "step": evaluation["step"].to_numpy(), "loss": evaluation["loss"].to_numpy(),
            "train_s": train_s}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _overtaking_step(moe: pd.DataFrame, dense: pd.DataFrame) -> float:
    """The first evaluated step from which the MoE run's validation loss stays
    strictly below the dense run's at every later common evaluation; NaN if
    it is not below at the last one."""
    both = moe.merge(dense, on="step", suffixes=("", "_dense")).sort_values("step")
    below = (both["loss"] < both["loss_dense"]).to_numpy()
    if not len(below) or not below[-1]:
        return math.nan
    above = np.flatnonzero(~below)
    return float(both["step"].iloc[above[-1] + 1 if len(above) else 0])


def overtaking_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per MoE run against the dense run of equal active FLOPs per
    token (same top_k; the first such dense run): run, model, dense_run,
    final_loss, dense_final_loss, gap (MoE - dense at the last common
    evaluation, negative = MoE better), overtakes_at_step (see
    _overtaking_step), overtakes_at_train_s (the MoE run's training time
    there)."""
    dense_of = {}
    for run, rows in curves[curves["dense"]].groupby("run", sort=False):
        dense_of.setdefault(int(rows["top_k"].iloc[0]), run)
    rows = []
    for run, moe in curves[~curves["dense"]].groupby("run", sort=False):
        k = int(moe["top_k"].iloc[0])
        dense_run = dense_of.get(k)
        dense = curves[curves["run"] == dense_run] if dense_run else moe.iloc[:0]
        both = moe.merge(dense, on="step", suffixes=("", "_dense"))
        step = _overtaking_step(moe[["step", "loss"]], dense[["step", "loss"]])
        at = moe.loc[moe["step"] == step, "train_s"]
        rows.append({"run": run, "model": moe["model"].iloc[0], "dense_run": dense_run,
                     "final_loss": float(moe["loss"].iloc[-1]),
                     "dense_final_loss": float(dense["loss"].iloc[-1]) if len(dense)
                     else math.nan,
                     "gap": float(both["loss"].iloc[-1] - both["loss_dense"].iloc[-1])
                     if len(both) else math.nan,
                     "overtakes_at_step": step,
                     "overtakes_at_train_s": float(at.iloc[0]) if len(at) else math.nan})
    return pd.DataFrame(rows)
