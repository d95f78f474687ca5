"""The C model against an independent PyTorch implementation (torch_moe.py).

For each config, build/export_reference runs one forward + backward on
training batch 0 and writes weights, routing, logits, losses and gradients;
torch_moe recomputes all of it in float64 from the same float32 weights. Run
by `make reference`; MOESIM_BUILD names the build directory.
"""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import torch_moe

# The bar for float32 C against float64 torch; do not loosen it.
REL_TOL = 1e-4

BUILD = Path(os.environ.get("MOESIM_BUILD", Path(__file__).resolve().parents[2] / "build"))
EXPORT = BUILD / "export_reference"

SMALL_MODEL = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
    "micro-batch-size": 4, "num-experts": 4, "moe-ffn-hidden-size": 48, "ffn-hidden-size": 64,
    "moe-aux-loss-coeff": 0.1, "moe-z-loss-coeff": 0.01,
}
SYNTHETIC = {"data-format": "synthetic", "synthetic-tokens": 20000}

# id -> (flags on top of SMALL_MODEL, whether capacity must drop assignments).
# A micro-batch is 64 tokens; group size 0 means one group of 64.
CONFIGS = {
    "top2-norm-tied-allmoe": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-router-norm-topk-prob": 1,
         "moe-expert-capacity-factor": 1.25}, False),
    "top2-nonorm-tied-allmoe-drop": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-router-norm-topk-prob": 0,
         "moe-expert-capacity-factor": 0.5}, True),
    "top1-nonorm-untied-groups16-drop": (
        {**SYNTHETIC, "moe-router-topk": 1, "moe-router-norm-topk-prob": 0,
         "untie-embeddings-and-output-weights": 1, "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.5}, True),
    "top1-norm-untied-mixed-groups32": (
        {**SYNTHETIC, "num-layers": 3, "moe-layer-freq": 2, "moe-router-topk": 1,
         "moe-router-norm-topk-prob": 1, "untie-embeddings-and-output-weights": 1,
         "moe-group-size": 32, "moe-expert-capacity-factor": 1.0}, False),
    "top2-norm-untied-mixed-groups16-drop": (
        {**SYNTHETIC, "moe-layer-freq": 2, "moe-router-topk": 2, "moe-router-norm-topk-prob": 1,
         "untie-embeddings-and-output-weights": 1, "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.5}, True),
    "top2-nonorm-tied-mixed4-groups8": (
        {**SYNTHETIC, "num-layers": 4, "moe-layer-freq": 2, "moe-router-topk": 2,
         "moe-router-norm-topk-prob": 0, "moe-group-size": 8,
         "moe-expert-capacity-factor": 1.0}, False),
    "top2-norm-tied-no-aux-losses": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-router-norm-topk-prob": 1,
         "moe-aux-loss-coeff": 0, "moe-z-loss-coeff": 0, "moe-expert-capacity-factor": 1.25},
        False),
    "fortunes-top2-norm-tied-groups32-drop": (
        {"moe-router-topk": 2, "moe-router-norm-topk-prob": 1, "moe-group-size": 32,
         "moe-expert-capacity-factor": 0.5}, True),
    # 10x the init: FFN pre-activations of a few units, where tanh-GELU and exact
    # GELU (and other near-linear slips) differ far beyond the tolerance.
    "large-weights-top2-norm-tied-drop": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-topk": 2, "moe-router-norm-topk-prob": 1,
         "moe-expert-capacity-factor": 0.75}, True),
    # ---- every other router, and the options around them (issue 17) ----
    "switch-groups16-drop": (
        {**SYNTHETIC, "moe-router-type": "switch", "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.5, "moe-min-capacity": 0}, True),
    "switch-dropless-untied": (
        {**SYNTHETIC, "moe-router-type": "switch", "moe-expert-capacity-factor": 0,
         "untie-embeddings-and-output-weights": 1}, False),
    "switch-large-weights-drop": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "switch",
         "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0}, True),
    "noisy-top2-importance-load-drop": (
        {**SYNTHETIC, "moe-router-type": "noisy_topk", "moe-router-topk": 2,
         "moe-importance-loss-coeff": 0.1, "moe-load-loss-coeff": 0.1, "moe-group-size": 32,
         "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "noisy-top1-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "noisy_topk", "moe-router-topk": 1,
         "moe-load-loss-coeff": 0.1, "moe-expert-capacity-factor": 0}, False),
    "gshard-top2-drop": (
        {**SYNTHETIC, "moe-router-type": "gshard_top2", "moe-group-size": 32,
         "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "gshard-top2-global-aux-seq16": (
        {**SYNTHETIC, "moe-router-type": "gshard_top2", "seq-length": 16,
         "moe-router-load-balancing-type": "global_aux_loss", "moe-group-size": 16,
         "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0}, True),
    "gshard-top2-large-weights-dropless": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "gshard_top2",
         "moe-expert-capacity-factor": 0}, False),
    "expert-choice-k1-groups16": (
        {**SYNTHETIC, "moe-router-type": "expert_choice", "moe-router-topk": 1,
         "moe-group-size": 16, "moe-expert-capacity-factor": 1.0}, True),
    "expert-choice-k2-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "expert_choice",
         "moe-router-topk": 2, "moe-expert-capacity-factor": 1.0}, True),
    "sinkhorn-top1-drop": (
        {**SYNTHETIC, "moe-router-type": "sinkhorn", "moe-router-topk": 1,
         "moe-group-size": 32, "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "sinkhorn-top2-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "sinkhorn", "moe-router-topk": 2,
         "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0}, False),
    "soft-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-type": "soft",
         "moe-importance-loss-coeff": 0.1}, False),
    "sigmoid-bias-top2-norm-drop": (
        {**SYNTHETIC, "moe-router-score-function": "sigmoid", "moe-router-enable-expert-bias": 1,
         "moe-router-topk": 2, "moe-router-norm-topk-prob": 1,
         "moe-router-load-balancing-type": "seq_aux_loss", "moe-expert-capacity-factor": 0.75,
         "moe-min-capacity": 0}, True),
    "sigmoid-bias-top2-nonorm-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-score-function": "sigmoid",
         "moe-router-enable-expert-bias": 1, "moe-router-topk": 2,
         "moe-router-norm-topk-prob": 0, "moe-expert-capacity-factor": 0}, False),
    "drop-by-probs-top2-nonorm": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-router-norm-topk-prob": 0,
         "moe-token-drop-policy": "probs", "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.5, "moe-min-capacity": 0}, True),
    "drop-by-probs-top1-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-router-topk": 1, "moe-router-norm-topk-prob": 0,
         "moe-token-drop-policy": "probs", "moe-expert-capacity-factor": 0.75,
         "moe-min-capacity": 0}, True),
    "dropless-top2-global-aux": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-expert-capacity-factor": 0,
         "moe-router-load-balancing-type": "global_aux_loss"}, False),
    "mixtral-softmax-over-selected-jitter": (
        {**SYNTHETIC, "moe-router-topk": 2, "moe-router-pre-softmax": 0,
         "moe-input-jitter-eps": 0.1, "moe-expert-capacity-factor": 1.0}, False),
    # DeepSeek-V3 group-limited routing: 8 experts in 4 groups, 2 groups per token
    "group-limited-sigmoid-bias-top4": (
        {**SYNTHETIC, "num-experts": 8, "moe-router-num-groups": 4, "moe-router-group-topk": 2,
         "moe-router-score-function": "sigmoid", "moe-router-enable-expert-bias": 1,
         "moe-router-topk": 4, "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0},
        True),
    "group-limited-top2-one-group-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "num-experts": 8, "moe-router-num-groups": 2,
         "moe-router-group-topk": 1, "moe-router-topk": 2, "moe-expert-capacity-factor": 0},
        False),
    "group-limited-gshard-drop": (
        {**SYNTHETIC, "num-experts": 8, "moe-router-num-groups": 4, "moe-router-group-topk": 1,
         "moe-router-type": "gshard_top2", "moe-expert-capacity-factor": 0.75,
         "moe-min-capacity": 0}, True),
    # Shazeer 2017's hierarchical MoE: 8 experts in groups of 4 or 2, a primary
    # router [groups, C] (layers.N.router_group_w) and one softmax per group
    "hierarchical-top2-one-group-drop": (
        {**SYNTHETIC, "num-experts": 8, "moe-hierarchical-groups": 2, "moe-router-topk": 2,
         "moe-router-pre-softmax": 1, "moe-router-norm-topk-prob": 0,
         "moe-importance-loss-coeff": 0.1, "moe-expert-capacity-factor": 0.75,
         "moe-min-capacity": 0}, True),
    "hierarchical-top4-two-of-four-groups-renormalised": (
        {**SYNTHETIC, "num-experts": 8, "moe-hierarchical-groups": 4,
         "moe-hierarchical-group-topk": 2, "moe-router-topk": 4,
         "moe-router-pre-softmax": 0, "moe-expert-capacity-factor": 1.0,
         "moe-min-capacity": 0}, True),
    "hierarchical-switch-large-weights-dropless": (
        {**SYNTHETIC, "weight-scale": 10, "num-experts": 8, "moe-hierarchical-groups": 2,
         "moe-router-type": "switch", "moe-expert-capacity-factor": 0,
         "moe-router-load-balancing-type": "seq_aux_loss"}, False),
    # ... and as the paper has it: noisy gating at both levels (the primary's
    # noise weights layers.N.router_group_noise_w), gates G_primary_i * G_i_j,
    # importance over them (Importance_H) and the hierarchical load Load_H
    "hierarchical-noisy-one-group-importance-load-drop": (
        {**SYNTHETIC, "num-experts": 8, "moe-hierarchical-groups": 2, "moe-router-topk": 2,
         "moe-router-type": "noisy_topk", "moe-importance-loss-coeff": 0.1,
         "moe-load-loss-coeff": 0.1, "moe-group-size": 32, "moe-expert-capacity-factor": 0.75,
         "moe-min-capacity": 0}, True),
    "hierarchical-noisy-two-of-four-groups-importance-load": (
        {**SYNTHETIC, "num-experts": 8, "moe-hierarchical-groups": 4,
         "moe-hierarchical-group-topk": 2, "moe-router-topk": 2, "moe-router-type": "noisy_topk",
         "moe-importance-loss-coeff": 0.1, "moe-load-loss-coeff": 0.1,
         "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0}, False),
    "hierarchical-noisy-both-groups-top4-importance-load-drop": (
        {**SYNTHETIC, "num-experts": 8, "moe-hierarchical-groups": 2,
         "moe-hierarchical-group-topk": 2, "moe-router-topk": 4, "moe-router-type": "noisy_topk",
         "moe-importance-loss-coeff": 0.1, "moe-load-loss-coeff": 0.1, "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "hierarchical-noisy-top1-large-weights-dropless": (
        {**SYNTHETIC, "weight-scale": 10, "num-experts": 8, "moe-hierarchical-groups": 2,
         "moe-router-topk": 1, "moe-router-type": "noisy_topk",
         "moe-importance-loss-coeff": 0.1, "moe-load-loss-coeff": 0.1,
         "moe-group-size": 16, "moe-expert-capacity-factor": 0}, False),
    "swiglu-shared-top2-drop": (
        {**SYNTHETIC, "moe-expert-activation": "swiglu",
         "moe-shared-expert-intermediate-size": 24, "moe-router-topk": 2,
         "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "swiglu-shared-switch-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-expert-activation": "swiglu",
         "moe-shared-expert-intermediate-size": 16, "moe-router-type": "switch",
         "moe-layer-freq": 2, "moe-expert-capacity-factor": 0}, False),
    # Switch's expert dropout: the C side exports each kept assignment's mask
    "expert-dropout-top2-drop": (
        {**SYNTHETIC, "moe-expert-dropout": 0.3, "moe-router-topk": 2,
         "moe-router-norm-topk-prob": 1, "moe-group-size": 16,
         "moe-expert-capacity-factor": 0.75, "moe-min-capacity": 0}, True),
    "expert-dropout-switch-groups16-large-weights": (
        {**SYNTHETIC, "weight-scale": 10, "moe-expert-dropout": 0.4, "moe-router-type": "switch",
         "moe-group-size": 16, "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 0},
        True),
    "expert-dropout-swiglu-shared-switch-dropless": (
        {**SYNTHETIC, "moe-expert-dropout": 0.5, "moe-expert-activation": "swiglu",
         "moe-shared-expert-intermediate-size": 16, "moe-router-type": "switch",
         "moe-expert-capacity-factor": 0}, False),
}


def mpi_singleton_env():
    """The caller's environment minus any enclosing mpirun's variables, so
    the exporter starts as its own MPI singleton."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def run_export(out_path, flags):
    if not EXPORT.is_file():
        pytest.fail(f"{EXPORT} not found; build it with `make build/export_reference` "
                    f"or point MOESIM_BUILD at the build directory")
    flags = dict(flags)
    argv = [str(EXPORT), str(out_path)]
    if "weight-scale" in flags:
        argv += ["--weight-scale", str(flags.pop("weight-scale"))]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return subprocess.run(argv, cwd=out_path.parent, env=mpi_singleton_env(),
                          capture_output=True, text=True, timeout=300)


def rel_err(c, t):
    """||c - t|| / ||t||; the plain difference when the reference is zero."""
    c, t = np.asarray(c, dtype=np.float64), np.asarray(t, dtype=np.float64)
    diff, scale = np.linalg.norm(c - t), np.linalg.norm(t)
    return diff / scale if scale > 0 else diff


def compare(export, ref, ref_grads):
    """Every check as (what, relative error or None, problem or None);
    problem is the failure message, None when the check passed."""
    checks = []

    def value(what, c, t):
        err = rel_err(c, t)
        problem = (f"{what}: relative error {err:.3e} > {REL_TOL:g} "
                   f"(|C| {np.linalg.norm(c):.6e}, |torch| {np.linalg.norm(t):.6e})"
                   if not err <= REL_TOL else None)
        checks.append((what, err, problem))

    def exact(what, c, t):
        """Identical arrays; for [N, K] routing arrays a row is a token."""
        c, t = np.asarray(c), np.asarray(t)
        if c.shape != t.shape:
            problem = f"{what}: shape {c.shape} in C, {t.shape} in torch"
        elif c.ndim == 0:
            problem = None if c == t else f"{what}: C {c}, torch {t}"
        else:
            rows = np.flatnonzero((c != t).reshape(len(c), -1).any(1))
            problem = (f"{what}: {len(rows)} of {len(c)} rows differ, first at row "
                       f"{rows[0]}: C {c[rows[0]].tolist()}, torch {t[rows[0]].tolist()}"
                       if len(rows) else None)
        checks.append((what, None, problem))

    moe_layers = [l for l in range(export.shape.L) if export.shape.is_moe_layer(l)]
    exact("routing layers", sorted(export.routing), moe_layers)
    for l in moe_layers:
        if l not in export.routing:
            continue
        mine, theirs = export.routing[l], ref["routing"][l]
        exact(f"routing/{l}/capacity", mine["capacity"], theirs["capacity"])
        exact(f"routing/{l}/choice_expert", mine["choice_expert"],
              theirs["choice_expert"].numpy())
        exact(f"routing/{l}/choice_kept", mine["choice_kept"],
              theirs["choice_kept"].numpy().astype(np.int32))
        if "choice_routed" in mine:
            exact(f"routing/{l}/choice_routed", mine["choice_routed"],
                  theirs["choice_routed"].numpy().astype(np.int32))
    value("logits", export.logits, ref["logits"].detach().numpy())
    for name in ("loss", "ce_loss") + torch_moe.LOSS_TERMS:
        value(name, getattr(export, name), ref[name].item())
    exact("gradient names", sorted(export.grads), sorted(ref_grads))
    exact("parameter names", sorted(export.params), sorted(export.grads))
    for name in sorted(set(export.grads) & set(ref_grads)):
        value(f"grads/{name}", export.grads[name], ref_grads[name])
    return checks


def report(config_id, checks):
    errors = [(what, err) for what, err, _ in checks if err is not None]
    worst_what, worst = max(errors, key=lambda e: e[1])
    grad_errors = [err for what, err in errors if what.startswith("grads/")]
    print(f"\n{config_id}: {len(checks)} checks; max relative error {worst:.3e} ({worst_what}); "
          f"max gradient relative error {max(grad_errors):.3e}")
    for what, err, problem in checks:
        print(f"  {'FAIL' if problem else 'ok  '} {what}"
              + (f"  rel {err:.3e}" if err is not None else ""))
    return [problem for _, _, problem in checks if problem]


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_matches_torch(config_id, tmp_path):
    extra, expect_drops = CONFIGS[config_id]
    out = tmp_path / "reference.h5"
    proc = run_export(out, {**SMALL_MODEL, **extra})
    assert proc.returncode == 0, (f"export_reference failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr}{proc.stdout}")
    export = torch_moe.load_export(out)
    ref, ref_grads = torch_moe.reference_step(export)

    problems = report(config_id, compare(export, ref, ref_grads))
    assert not problems, f"{config_id}: {len(problems)} mismatches:\n" + "\n".join(problems)

    dropped = {l: int((r["choice_kept"] == 0).sum()) for l, r in export.routing.items()}
    total = {l: r["choice_kept"].size for l, r in export.routing.items()}
    print("  dropped assignments per MoE layer: "
          + ", ".join(f"layer {l}: {dropped[l]}/{total[l]}" for l in sorted(dropped)))
    if expect_drops:
        assert all(dropped.values()), (
            f"{config_id} is meant to exercise capacity drops but some MoE layer dropped "
            f"nothing: {dropped}; lower its capacity factor")


def test_comparison_catches_small_errors(tmp_path):
    """The checker itself: a gradient off by 1e-3 relative, and one routing
    decision flipped, must each be reported by name."""
    extra, _ = CONFIGS["top2-nonorm-tied-allmoe-drop"]
    out = tmp_path / "reference.h5"
    proc = run_export(out, {**SMALL_MODEL, **extra})
    assert proc.returncode == 0, proc.stderr
    export = torch_moe.load_export(out)
    ref, ref_grads = torch_moe.reference_step(export)
    export.grads["layers.1.router_w"] = export.grads["layers.1.router_w"] * (1 + 1e-3)
    export.routing[0]["choice_kept"][5, 1] ^= 1
    problems = [p for _, _, p in compare(export, ref, ref_grads) if p]
    assert len(problems) == 2, problems
    assert problems[0].startswith("routing/0/choice_kept: 1 of 64 rows differ, first at row 5")
    assert problems[1].startswith("grads/layers.1.router_w: relative error 1.000e-03")


def test_export_fails_cleanly_on_a_bad_flag(tmp_path):
    out = tmp_path / "reference.h5"
    proc = run_export(out, {**SMALL_MODEL, **SYNTHETIC, "num-experts": 2, "moe-router-topk": 3})
    assert proc.returncode != 0
    assert "moe-router-topk" in proc.stderr
    assert not out.exists()
