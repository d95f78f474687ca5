"""Routing mechanisms seen through whole training runs and their records, as
a researcher would check them: the ST-MoE z-loss and DeepSeek-V3's expert
bias. tests/test_routers.cpp checks each mechanism on the router alone
(including an adversarially skewed router and large logits); here the same
rules must hold end to end, on more than one rank, in what the record says.

Every run goes through moesim_run with a timeout, so no test can hang."""
import h5py
import numpy as np
import pytest

from moesim_run import train_record

SMALL = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
    "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64,
    "eval-iters": 1, "progress-interval": 1000, "data-format": "synthetic",
    "synthetic-tokens": 20000, "moe-group-size": 32, "lr-warmup-iters": 5,
}
RUN_TIMEOUT = 120


def train(tmp_path, name, ranks=1, **options):
    out = tmp_path / f"{name}.h5"
    options = {**SMALL, **options, "out": out}
    options.setdefault("eval-interval", options["train-iters"])
    with h5py.File(train_record(options, ranks, timeout=RUN_TIMEOUT), "r") as f:
        return {name: f[name][()] for name in ("routing/z_loss", "routing/logsumexp_sq",
                                               "routing/mean_abs_logit", "routing/expert_bias",
                                               "routing/tokens_per_expert", "routing/load_cv")}


# ---- z-loss -------------------------------------------------------------------------

Z_STEPS = 50
Z_COEFF = 1e-2


@pytest.fixture(scope="module")
def z_runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("z")
    return {coeff: train(directory, f"z{coeff}", ranks=2, **{
        "micro-batch-size": 2, "train-iters": Z_STEPS, "lr": 3e-3, "moe-z-loss-coeff": coeff})
        for coeff in (0.0, Z_COEFF)}


def test_z_loss_is_its_coefficient_times_the_recorded_logsumexp_squared(z_runs):
    run = z_runs[Z_COEFF]
    np.testing.assert_allclose(run["routing/z_loss"], Z_COEFF * run["routing/logsumexp_sq"],
                               rtol=1e-6)
    assert np.all(z_runs[0.0]["routing/z_loss"] == 0.0)


def test_z_loss_drives_the_router_logsumexp_towards_zero(z_runs):
    """Without it, near-uniform routing keeps logsumexp near log E (lse^2 ~ 1.9
    for 4 experts); with it the router learns lse ~ 0 within tens of steps."""
    without = z_runs[0.0]["routing/logsumexp_sq"]
    with_z = z_runs[Z_COEFF]["routing/logsumexp_sq"]
    np.testing.assert_allclose(without[0], with_z[0], rtol=1e-6)  # same start
    assert np.all(without[-1] > 0.5 * np.log(4) ** 2), without[-1]
    assert np.all(with_z[-1] < 0.25 * without[-1]), (with_z[-1], without[-1])


def test_mean_abs_logit_is_recorded_per_layer(z_runs):
    """Nonzero and finite: small here, since the router starts near zero. (That
    z-loss then raises |logit| towards log E, its optimum lse = 0, is a fact of
    this scale; tests/test_routers.cpp shows it lowering large logits.)"""
    for run in z_runs.values():
        values = run["routing/mean_abs_logit"]
        assert values.shape == (Z_STEPS, 2)
        assert np.all(np.isfinite(values)) and np.all(values > 0)


# ---- expert bias (DeepSeek-V3) -------------------------------------------------------

BIAS_STEPS = 20
BIAS_RATE = 1e-3


def bias_run(tmp_path, name, **extra):
    return train(tmp_path, name, ranks=2, **{
        "micro-batch-size": 2, "train-iters": BIAS_STEPS, "moe-router-score-function": "sigmoid",
        "moe-aux-loss-coeff": 0, "moe-expert-capacity-factor": 0, **extra})


def test_expert_bias_moves_by_the_sign_of_the_load_error_every_step(tmp_path):
    run = bias_run(tmp_path, "bias", **{"moe-router-enable-expert-bias": 1,
                                        "moe-router-bias-update-rate": BIAS_RATE})
    bias, load = run["routing/expert_bias"], run["routing/tokens_per_expert"].astype(float)
    assert bias.shape == load.shape == (BIAS_STEPS, 2, 4)
    assert np.all(bias[0] == 0.0)
    error = load.mean(axis=2, keepdims=True) - load
    expected = BIAS_RATE * np.sign(error[:-1])
    np.testing.assert_allclose(np.diff(bias, axis=0), expected, rtol=0, atol=1e-7)
    assert np.any(bias[-1] != 0.0), "the load was never uneven: the test proves nothing"


def test_without_the_flag_the_recorded_expert_bias_is_zero(tmp_path):
    run = bias_run(tmp_path, "nobias")
    assert np.all(run["routing/expert_bias"] == 0.0)


# ---- group-limited routing in /traffic ------------------------------------------------

def dispatch_bytes(tmp_path, name, **options):
    """/traffic/dispatch_bytes [steps, P, P] and /train/tokens of a 2-rank,
    EP 2, dropless, top-2 run over 8 experts."""
    out = tmp_path / f"{name}.h5"
    options = {**SMALL, "num-experts": 8, "moe-router-topk": 2, "moe-expert-capacity-factor": 0,
               "micro-batch-size": 2, "train-iters": 10, "eval-interval": 10, **options,
               "out": out}
    with h5py.File(train_record(options, 2, timeout=RUN_TIMEOUT), "r") as f:
        return f["traffic/dispatch_bytes"][()]


def test_group_limited_routing_sends_each_token_to_one_rank(tmp_path):
    """Groups = EP ranks (each rank owns 4 consecutive experts) and one group per
    token: each token's two rows go to one rank, so every cell of the traffic
    matrix, in every step, is a whole number of token pairs. Plain top-2
    splits some tokens across the ranks, and then some cell holds an odd
    number of rows."""
    plain = dispatch_bytes(tmp_path, "plain")
    limited = dispatch_bytes(tmp_path, "limited", **{"moe-router-num-groups": 2,
                                                     "moe-router-group-topk": 1})
    # dropless: every step moves tokens x k x MoE layers rows in all
    rows = 2 * 2 * 16 * 2 * 2  # ranks x micro-batch x seq x k x layers
    row_bytes = plain[0].sum() // rows
    assert plain[0].sum() == rows * row_bytes and limited.sum() == plain.sum()
    assert row_bytes > 0
    assert np.all(limited % (2 * row_bytes) == 0), limited // row_bytes
    assert np.any(plain % (2 * row_bytes) != 0), "plain top-2 should split some tokens"


def test_hierarchical_moe_sends_each_token_to_one_rank(tmp_path):
    """Shazeer 2017's hierarchical MoE with its groups = EP ranks and k_1 = 1
    group per token: as for group-limited routing, each token's two rows go
    to one rank, so every traffic cell is a whole number of token pairs.
    With k_1 = 2 groups of one expert each a token's two rows always reach
    both ranks: every cell off the diagonal is nonzero and no token pair
    stays whole."""
    plain = dispatch_bytes(tmp_path, "plain")
    one_group = dispatch_bytes(tmp_path, "hier1", **{"moe-hierarchical-groups": 2})
    both = dispatch_bytes(tmp_path, "hier2", **{"moe-hierarchical-groups": 2,
                                                "moe-hierarchical-group-topk": 2})
    rows = 2 * 2 * 16 * 2 * 2  # ranks x micro-batch x seq x k x layers
    row_bytes = plain[0].sum() // rows
    assert row_bytes > 0 and one_group.sum() == plain.sum() == both.sum()
    assert np.all(one_group % (2 * row_bytes) == 0), one_group // row_bytes
    # k_1 = 2: every token sends exactly one row to each rank
    per_step = both.reshape(len(both), 2, 2) // row_bytes
    assert np.all(per_step == rows // 4), per_step[0]
