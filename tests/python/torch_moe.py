"""torch_moe: an independent PyTorch implementation of moesim's model, used as
the reference that tests/python/test_reference.py holds the C model to.

It is written from the model's definition, not from the C loops: whole-tensor
torch ops (softmax, sort, gather, scatter, cumsum, einsum, F.gelu,
F.cross_entropy) in float64, with autograd for every gradient. Experts run
densely over every token; a token's combine weight for an expert it did not
choose, or that dropped it, is zero, which is what removes it.

Reads the HDF5 tensor file written by tests/reference/export_reference.c.
"""
import math
from dataclasses import dataclass
from fractions import Fraction

import h5py
import numpy as np
import torch
import torch.nn.functional as F

RMSNORM_EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    V: int
    T: int
    C: int
    NH: int
    L: int
    F: int
    E: int
    K: int
    Fe: int
    G: int
    B: int
    moe_layer_freq: int
    tied: bool
    norm_topk_prob: bool
    capacity_factor: float
    min_capacity: int
    aux_loss_coeff: float
    z_loss_coeff: float
    router_type: str = "topk"
    sigmoid_scores: bool = False
    softmax_over_selected: bool = False
    drop_by_prob: bool = False
    balancing: str = "aux_loss"
    importance_loss_coeff: float = 0.0
    load_loss_coeff: float = 0.0
    expert_bias: bool = False
    swiglu: bool = False
    shared_F: int = 0
    num_groups: int = 0
    group_topk: int = 0
    hier_groups: int = 0
    hier_group_topk: int = 0
    expert_dropout: float = 0.0

    def is_moe_layer(self, layer):
        return (layer + 1) % self.moe_layer_freq == 0


@dataclass
class Export:
    """Everything the C side wrote, as numpy arrays and Python numbers."""
    shape: Shape
    params: dict     # name -> float32 array
    grads: dict      # name -> float32 array
    inputs: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    loss: float
    ce_loss: float
    aux_loss: float
    z_loss: float
    importance_loss: float
    load_loss: float
    routing: dict    # layer -> {"choice_expert", "choice_kept", "choice_routed", "capacity",
                     #           and the draws: "noise", "group_noise", "jitter",
                     #           "second_draw", "expert_bias",
                     #           "dropout_mask"}


# The C enums' order (router.h): RouterType and BalancingType.
ROUTER_TYPES = ("topk", "switch", "noisy_topk", "gshard_top2", "expert_choice", "sinkhorn", "soft")
BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def load_export(path):
    int_keys = ("V", "T", "C", "NH", "L", "F", "E", "K", "Fe", "G", "B", "moe_layer_freq",
                "min_capacity", "shared_F", "num_groups", "group_topk", "hier_groups",
                "hier_group_topk")
    float_keys = ("capacity_factor", "aux_loss_coeff", "z_loss_coeff", "importance_loss_coeff",
                  "load_loss_coeff", "expert_dropout")
    bool_keys = ("tied", "norm_topk_prob", "sigmoid_scores", "softmax_over_selected",
                 "drop_by_prob", "expert_bias", "swiglu")
    with h5py.File(path, "r") as f:
        cfg = {k: f["config"][k][()] for k in f["config"]}
        shape = Shape(**{k: int(cfg[k]) for k in int_keys},
                      **{k: float(cfg[k]) for k in float_keys},
                      **{k: bool(cfg[k]) for k in bool_keys},
                      router_type=ROUTER_TYPES[int(cfg["router_type"])],
                      balancing=BALANCING_TYPES[int(cfg["balancing"])])
        routing = {}
        if "routing" in f:
            for layer, g in f["routing"].items():
                routing[int(layer)] = {k: g[k][()] for k in g}
                routing[int(layer)]["capacity"] = int(g["capacity"][()])
        return Export(
            shape=shape,
            params={k: v[()] for k, v in _leaves(f["params"])},
            grads={k: v[()] for k, v in _leaves(f["grads"])},
            inputs=f["inputs"][()], targets=f["targets"][()], logits=f["logits"][()],
            loss=float(f["loss"][()]), ce_loss=float(f["ce_loss"][()]),
            aux_loss=float(f["aux_loss"][()]), z_loss=float(f["z_loss"][()]),
            importance_loss=float(f["importance_loss"][()]),
            load_loss=float(f["load_loss"][()]), routing=routing)


def _leaves(group):
    """(name, dataset) for the datasets directly in group (parameter names
    contain dots, never slashes, so they are all direct children)."""
    return [(k, v) for k, v in group.items() if isinstance(v, h5py.Dataset)]


def expert_capacity(capacity_factor, G, K, E):
    """ceil(cf * G * K / E), at least 1, computed in exact rational
    arithmetic on the factor's shortest decimal spelling, so 1.1 * 100 / 10
    is exactly 11 rather than 11.000000000000002."""
    exact = Fraction(repr(capacity_factor)) * G * K / E
    return max(1, math.ceil(exact))


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS) * w


def ffn(x, w1, w2, swiglu=False):
    """GELU (tanh) FFN, or SwiGLU with w1's rows [gate | up] (Shazeer 2020)."""
    h = x @ w1.T
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2.T
    return F.gelu(h, approximate="tanh") @ w2.T


def causal_self_attention(x, qkv_w, proj_w, B, T, NH):
    C = x.shape[-1]
    q, k, v = (x @ qkv_w.T).view(B, T, 3 * C).split(C, dim=-1)
    heads = lambda t: t.view(B, T, NH, C // NH).transpose(1, 2)  # [B, NH, T, hs]
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // NH)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = scores.masked_fill(future, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B * T, C)
    return y @ proj_w.T


def sinkhorn(h, tol=1e-4, max_iterations=200):
    """Megatron-Core's Sinkhorn over one routing group's logits h[G, E]:
    rescale exp(h) until every token's row and every expert's column carry
    equal mass (mean |change of the column scales| below tol)."""
    cost = torch.exp(h - h.max())
    G, E = cost.shape
    d0 = torch.ones(G, dtype=h.dtype)
    d1 = torch.ones(E, dtype=h.dtype)
    for _ in range(max_iterations):
        d0 = 1.0 / G / ((d1 * cost).sum(1) + 1e-8)
        d1_next = 1.0 / E / ((d0[:, None] * cost).sum(0) + 1e-8)
        error = (d1_next - d1).abs().mean()
        d1 = d1_next
        if error < tol:
            break
    return d0[:, None] * cost * d1


def limit_to_best_groups(select, num_groups, group_topk, K):
    """DeepSeek-V3's group-limited routing as Megatron-Core defines it: the
    experts form num_groups groups of consecutive experts; a group scores the
    sum of its top max(1, K // group_topk) selection scores; every expert
    outside a token's group_topk best groups gets -inf."""
    N, E = select.shape
    per_group = E // num_groups
    summed = min(max(1, K // group_topk), per_group)
    by_group = select.view(N, num_groups, per_group)
    group_score = torch.sort(by_group, dim=-1, descending=True)[0][..., :summed].sum(-1)
    best = torch.sort(group_score, dim=-1, descending=True, stable=True)[1][:, :group_topk]
    allowed = torch.zeros(N, num_groups, dtype=torch.bool).scatter(1, best, True)
    return by_group.masked_fill(~allowed[..., None], float("-inf")).view(N, E)


def keep_within_capacity(choice_expert, routed, order_key, G, E, capacity):
    """[N, S] bool: routed assignments that fit their expert's capacity in
    their group, the group's assignments taken in order_key order (a per-
    assignment sort key; ties by assignment index)."""
    N, S = choice_expert.shape
    kept = torch.zeros(N, S, dtype=torch.bool)
    for g in range(N // G):
        rows = slice(g * G, (g + 1) * G)
        expert = choice_expert[rows].reshape(-1)
        is_routed = routed[rows].reshape(-1)
        order = torch.sort(order_key[rows].reshape(-1), stable=True)[1]
        arrivals = (F.one_hot(expert[order], E) * is_routed[order, None]).cumsum(0)
        arrival = arrivals.gather(1, expert[order, None]).squeeze(1)
        fits = torch.zeros_like(is_routed)
        fits[order] = is_routed[order] & (arrival <= capacity)
        kept[rows] = fits.view(G, S)
    return kept


def cv_squared(v):
    """Squared coefficient of variation along the last axis (population
    variance), 0 where the mean is 0."""
    mean = v.mean(-1)
    var = (v - mean[..., None]).pow(2).mean(-1)
    return torch.where(mean > 0, var / mean.clamp_min(1e-300).pow(2), torch.zeros_like(mean))


def top_k_gates(h, probs, choice_expert, s, primary=None):
    """The combine weights of the k selected experts [N, K]."""
    selected = probs.gather(1, choice_expert)
    if s.hier_groups > 0 and s.router_type == "noisy_topk":
        # Shazeer 2017, appendix B: G_primary(x)_i * G_i(x)_j, each
        # Softmax(KeepTopK) of its level's noisy logits
        N, K = choice_expert.shape
        k1 = s.hier_group_topk
        within = K // k1
        kept_groups = choice_expert[:, ::within] // (s.E // s.hier_groups)
        G_primary = primary[1].gather(1, kept_groups).softmax(-1)
        G_within = h.gather(1, choice_expert).view(N, k1, within).softmax(-1)
        return (G_primary[..., None] * G_within).view(N, K)
    if s.hier_groups > 0:
        # the products P_i * q_j, renormalised over the token's k experts
        # or not; with one group per token (the paper's k_1 = 1) the former is
        # Softmax(KeepTopK) of the group's logits: Shazeer 2017 at both levels
        renormalise = s.norm_topk_prob or s.softmax_over_selected
        return selected / selected.sum(-1, keepdim=True) if renormalise else selected
    if s.sigmoid_scores:
        # DeepSeek-V3: g = s / sum of the selected s
        renormalise = s.norm_topk_prob or s.softmax_over_selected
        return selected / selected.sum(-1, keepdim=True) if renormalise else selected
    if s.softmax_over_selected or s.router_type == "noisy_topk":
        # Mixtral; Shazeer 2017: G = Softmax(KeepTopK(H, k))
        return h.gather(1, choice_expert).softmax(-1)
    if s.norm_topk_prob or s.router_type == "gshard_top2":
        # GShard: g1, g2 = g1 / (g1 + g2), g2 / (g1 + g2)
        return selected / selected.sum(-1, keepdim=True)
    return selected  # Switch: the expert's output scaled by its probability


def hierarchical_probs(x_in, h, group_w, groups, group_noise_w=None, group_noise=None):
    """Shazeer 2017, appendix B: the score of expert j of group i is
    G_primary(x)_i * G_i(x)_j, a softmax over the primary logits x·Wgroup
    times a softmax over group i's own (noisy) logits h (its E / groups rows
    of router_w). With noisy_topk the primary is noisy too: x·Wgroup +
    StandardNormal() · Softplus(x·Wgroup_noise). Returns (probs [N, E],
    primary: clean logits, noisy logits and noise std [N, groups])."""
    N, E = h.shape
    clean = x_in @ group_w.T
    noisy, std = clean, None
    if group_noise_w is not None:
        std = F.softplus(x_in @ group_noise_w.T)
        noisy = clean + group_noise * std
    within = h.view(N, groups, E // groups).softmax(-1)
    return (noisy.softmax(-1)[:, :, None] * within).view(N, E), (clean, noisy, std)


def hierarchical_choice(select, primary, groups, group_topk, K):
    """[N, K]: the group_topk best groups by primary logit, best first; in
    each, its K / group_topk best experts by score. Ties to the lower index."""
    N, E = select.shape
    per_group = E // groups
    best = torch.sort(primary.detach(), dim=-1, descending=True, stable=True)[1][:, :group_topk]
    by_group = select.view(N, groups, per_group)
    chosen = []
    for m in range(group_topk):
        scores = by_group.gather(1, best[:, m, None, None].expand(N, 1, per_group)).squeeze(1)
        within = torch.sort(scores, dim=-1, descending=True, stable=True)[1][:, :K // group_topk]
        chosen.append(within + best[:, m, None] * per_group)
    return torch.cat(chosen, dim=1)


def smooth_load(clean, noisy, std, chosen, k):
    """Shazeer 2017's P(x, i) over the last axis of n experts, chosen the
    bool mask of the k a token took: Phi((clean_i - kth_excluding(noisy, k,
    i)) / std_i). With k >= n every expert is taken for sure: 1."""
    n = clean.shape[-1]
    if k >= n:
        return torch.ones_like(clean)
    ranked = torch.sort(noisy, dim=-1, descending=True)[0]
    threshold = torch.where(chosen, ranked[..., k:k + 1], ranked[..., k - 1:k])
    return 0.5 * torch.erfc(-(clean - threshold) / std / math.sqrt(2.0))


def hierarchical_load(primary, logits, h, noise_std, choice_expert, s):
    """Shazeer 2017, appendix B, per routing group of G tokens [groups, E]:
    Load_H(X)_(i,j) = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|, X^(i)
    the tokens that took group i, each load the smooth estimator of its
    level's noisy top-k; 0 where no token took group i."""
    clean, noisy, std = primary
    N, E = logits.shape
    hg, G = s.hier_groups, s.G
    b, k1 = E // hg, s.hier_group_topk
    took_group = torch.zeros(N, hg, dtype=torch.bool).scatter(1, choice_expert // b, True)
    took_expert = torch.zeros(N, E, dtype=torch.bool).scatter(1, choice_expert, True)
    load_primary = smooth_load(clean, noisy, std, took_group, k1)
    load_within = smooth_load(logits.view(N, hg, b), h.view(N, hg, b), noise_std.view(N, hg, b),
                              took_expert.view(N, hg, b), s.K // k1) * took_group[..., None]
    groups = N // G
    Lp = load_primary.view(groups, G, hg).sum(1)
    Lw = load_within.view(groups, G, hg, b).sum(1)
    n = took_group.view(groups, G, hg).sum(1).to(logits.dtype)
    load = torch.where(n[..., None] > 0, Lp[..., None] * Lw / n.clamp_min(1)[..., None],
                       torch.zeros_like(Lw))
    return load.view(groups, E)


def route(x, router_w, noise_w, s, draws, group_w=None, group_noise_w=None):
    """Router decisions and losses for N tokens x[N, C] in groups of G, each
    router as its paper (or Megatron-Core) defines it. draws: what the C side
    drew at random (noise [N, E], jitter [N, C], second_draw [N]) and the
    expert_bias [E].

    Returns (combine[N, E], info): combine holds each kept assignment's gate
    at its expert and zero elsewhere; info has choice_expert, choice_routed
    and choice_kept [N, slots], capacity, and every loss term."""
    N, E, K, G = x.shape[0], s.E, s.K, s.G
    kind = s.router_type
    tensor = lambda name: torch.tensor(draws[name], dtype=x.dtype)
    # ST-MoE jitter: the router input times U(1 - eps, 1 + eps)
    x_in = x * tensor("jitter") if "jitter" in draws else x
    logits = x_in @ router_w.T                                      # [N, E]
    h = logits
    if kind == "noisy_topk":
        # Shazeer 2017: H = x·Wg + StandardNormal() · Softplus(x·Wnoise)
        noise_std = F.softplus(x_in @ noise_w.T)
        h = logits + tensor("noise") * noise_std
    probs = h.sigmoid() if s.sigmoid_scores else h.softmax(-1)
    if s.hier_groups > 0:
        noisy_primary = kind == "noisy_topk"
        probs, primary = hierarchical_probs(
            x_in, h, group_w, s.hier_groups, group_noise_w if noisy_primary else None,
            tensor("group_noise") if noisy_primary else None)

    every_expert = torch.arange(E).expand(N, E)
    if kind == "soft":
        choice_expert, gates = every_expert, probs
        routed = kept = torch.ones(N, E, dtype=torch.bool)
        capacity = 0
    elif kind == "expert_choice":
        # Zhou 2022: S = Softmax(X·Wg); each expert takes the top-C tokens
        # of its column in every group, gate = S
        capacity = expert_capacity(s.capacity_factor, G, K, E)
        routed = torch.zeros(N, E, dtype=torch.bool)
        for g in range(N // G):
            column_order = torch.sort(probs[g * G:(g + 1) * G].detach(), dim=0,
                                      descending=True, stable=True)[1]
            routed[g * G + column_order[:min(capacity, G)], torch.arange(E)] = True
        choice_expert, gates, kept = every_expert, probs, routed
    else:
        select = probs.detach()
        if kind == "sinkhorn":
            select = torch.cat([sinkhorn(h.detach()[g * G:(g + 1) * G]) for g in range(N // G)])
        if "expert_bias" in draws:
            select = select + tensor("expert_bias")   # DeepSeek-V3: selection only
        if s.num_groups > 0:
            select = limit_to_best_groups(select, s.num_groups, s.group_topk, K)
        # A stable descending sort puts the lower expert first among equal
        # scores, which is the tie rule.
        if s.hier_groups > 0:
            choice_expert = hierarchical_choice(select, primary[1], s.hier_groups,
                                                s.hier_group_topk, K)
        else:
            choice_expert = torch.sort(select, dim=-1, descending=True, stable=True)[1][:, :K]
        gates = top_k_gates(h, probs, choice_expert, s, primary if s.hier_groups > 0 else None)
        routed = torch.ones(N, K, dtype=torch.bool)
        if kind == "gshard_top2":
            # GShard: the second expert gets the token with probability 2 * g2
            routed[:, 1] = tensor("second_draw") < 2 * gates[:, 1].detach()
        # DeepSpeed's floor: never fewer slots than --moe-min-capacity
        capacity = max(expert_capacity(s.capacity_factor, G, K, E), s.min_capacity)
        if s.capacity_factor <= 0:
            kept, capacity = routed.clone(), 0
        else:
            slot = torch.arange(N * K, dtype=x.dtype).view(N, K)
            if s.drop_by_prob:
                # the highest gates stay; ties to the earlier assignment
                order_key = -gates.detach()
            elif kind == "gshard_top2":
                # GShard fills every token's first choice before any second
                order_key = torch.arange(K, dtype=x.dtype)[None, :] * N + \
                    torch.arange(N, dtype=x.dtype)[:, None]
            else:
                order_key = slot                 # token by token (Megatron)
            kept = keep_within_capacity(choice_expert, routed, order_key, G, E, capacity)
    combine = torch.zeros(N, E, dtype=x.dtype).scatter_add(
        1, choice_expert, gates * kept.to(x.dtype))

    # Switch load balancing: coeff * E * sum_e f_e * P_e per unit (routing
    # group, sequence, or the whole batch), f = the unit's share of its
    # tokens * k routed assignments (no gradient), P = its mean probability.
    if s.balancing == "none" or s.aux_loss_coeff == 0:
        aux_loss = torch.zeros((), dtype=x.dtype)
    else:
        unit = {"aux_loss": G, "seq_aux_loss": s.T, "global_aux_loss": N}[s.balancing]
        # GShard (Algorithm 1): c_e counts each token's first choice only
        counted = routed.clone()
        if kind == "gshard_top2":
            counted[:, 1:] = False
        demand = torch.zeros(N, E, dtype=x.dtype).scatter_add(1, choice_expert, counted.to(x.dtype))
        f = demand.view(N // unit, unit, E).sum(1) / (unit * (1 if kind == "gshard_top2" else K))
        # DeepSeek-V3: with sigmoid scores, P averages s' = s / sum_j s_j
        scores = probs / probs.sum(-1, keepdim=True) if s.sigmoid_scores else probs
        P = scores.view(N // unit, unit, E).mean(1)
        aux_loss = s.aux_loss_coeff * E * (f * P).sum(-1).mean()
    lse = h.logsumexp(-1)
    z_loss = s.z_loss_coeff * lse.pow(2).mean()
    # Shazeer 2017: importance = the summed gates of each expert, per group
    if s.importance_loss_coeff > 0:
        importance = torch.zeros(N, E, dtype=x.dtype).scatter_add(
            1, choice_expert, gates * routed.to(x.dtype))
        importance_loss = s.importance_loss_coeff * cv_squared(
            importance.view(N // G, G, E).sum(1)).mean()
    else:
        importance_loss = torch.zeros((), dtype=x.dtype)
    # Shazeer 2017's smooth load: P(x, i) = Phi((x·Wg_i - kth_excluding(H, k, i)) / std_i),
    # the k-th largest noisy logit among the other experts
    if kind == "noisy_topk" and s.load_loss_coeff > 0 and s.hier_groups > 0:
        load = hierarchical_load(primary, logits, h, noise_std, choice_expert, s)
        load_loss = s.load_loss_coeff * cv_squared(load).mean()
    elif kind == "noisy_topk" and s.load_loss_coeff > 0 and K < E:
        ranked = torch.sort(h, dim=-1, descending=True)[0]
        in_top_k = torch.zeros(N, E, dtype=torch.bool).scatter(1, choice_expert, True)
        threshold = torch.where(in_top_k, ranked[:, K:K + 1], ranked[:, K - 1:K])
        z = (logits - threshold) / noise_std
        load = (0.5 * torch.erfc(-z / math.sqrt(2.0))).view(N // G, G, E).sum(1)
        load_loss = s.load_loss_coeff * cv_squared(load).mean()
    else:
        load_loss = torch.zeros((), dtype=x.dtype)
    return combine, {"choice_expert": choice_expert, "choice_routed": routed,
                     "choice_kept": kept, "capacity": capacity, "aux_loss": aux_loss,
                     "z_loss": z_loss, "importance_loss": importance_loss,
                     "load_loss": load_loss}


def expert_dropout_factors(info, mask, E):
    """[E, N, F]: Switch's expert dropout as the C side drew it, mask [N,
    slots, F] holding each kept assignment's factors (0 or 1 / (1 - rate));
    ones where a token has no kept assignment, whose combine weight is 0."""
    N, S, Fe = mask.shape
    factors = torch.ones(E, N, Fe, dtype=mask.dtype)
    kept = info["choice_kept"]
    tokens = torch.arange(N)[:, None].expand(N, S)
    experts = info["choice_expert"]
    factors[experts[kept], tokens[kept]] = mask[kept]
    return factors


def moe_ffn(x, p, s, draws):
    """One MoE layer; p(name) gives the layer's parameter."""
    combine, info = route(x, p("router_w"), p("noise_w"), s, draws, p("router_group_w"),
                          p("router_group_noise_w"))
    h = torch.einsum("nc,efc->enf", x, p("experts.fc1_w"))         # every expert, every token
    if s.swiglu:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
    else:
        act = F.gelu(h, approximate="tanh")
    if "dropout_mask" in draws:
        act = act * expert_dropout_factors(info, torch.tensor(draws["dropout_mask"],
                                                              dtype=x.dtype), s.E)
    y = torch.einsum("enf,ecf->enc", act, p("experts.fc2_w"))
    out = torch.einsum("ne,enc->nc", combine, y)
    if s.shared_F > 0:
        # DeepSeek's shared expert: every token, weight 1, beside the routed ones
        out = out + ffn(x, p("shared_fc1_w"), p("shared_fc2_w"), s.swiglu)
    return out, info


LOSS_TERMS = ("aux_loss", "z_loss", "importance_loss", "load_loss")


def forward(params, s, inputs, targets, draws=None):
    """params: name -> float64 tensor (leaves, requires_grad as wanted);
    inputs/targets: [B, T] integer tensors; draws: layer -> the C side's
    random draws (route). Returns a dict with loss, ce_loss and each of
    LOSS_TERMS (tensors), logits [N, V] and routing {layer: info}."""
    B, T = inputs.shape
    x = (params["wte"][inputs] + params["wpe"][:T]).view(B * T, s.C)
    terms = {name: torch.zeros((), dtype=x.dtype) for name in LOSS_TERMS}
    routing = {}
    for l in range(s.L):
        p = lambda name: params.get(f"layers.{l}.{name}")
        x = x + causal_self_attention(rms_norm(x, p("ln1_w")), p("qkv_w"), p("proj_w"), B, T, s.NH)
        h = rms_norm(x, p("ln2_w"))
        if s.is_moe_layer(l):
            out, info = moe_ffn(h, p, s, (draws or {}).get(l, {}))
            for name in LOSS_TERMS:
                terms[name] = terms[name] + info[name]
            routing[l] = info
        else:
            out = ffn(h, p("fc1_w"), p("fc2_w"))
        x = x + out
    lm_head = params["wte"] if s.tied else params["lm_head_w"]
    logits = rms_norm(x, params["lnf_w"]) @ lm_head.T
    ce_loss = F.cross_entropy(logits, targets.reshape(-1))
    return {"loss": ce_loss + sum(terms.values()), "ce_loss": ce_loss, **terms,
            "logits": logits, "routing": routing}


def reference_step(export):
    """Forward + backward in float64 from the exported float32 weights and
    the C side's random draws. Returns (forward result, grads as name ->
    float64 numpy array)."""
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in export.params.items()}
    inputs = torch.tensor(export.inputs, dtype=torch.long)
    targets = torch.tensor(export.targets, dtype=torch.long)
    draw_names = ("noise", "group_noise", "jitter", "second_draw", "expert_bias",
                  "dropout_mask")
    draws = {l: {k: v for k, v in r.items() if k in draw_names}
             for l, r in export.routing.items()}
    out = forward(params, export.shape, inputs, targets, draws)
    out["loss"].backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
             for k, p in params.items()}
    return out, grads
