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
    routing: dict    # layer -> {"choice_expert", "choice_kept", "capacity"}


def load_export(path):
    int_keys = ("V", "T", "C", "NH", "L", "F", "E", "K", "Fe", "G", "B", "moe_layer_freq")
    with h5py.File(path, "r") as f:
        cfg = {k: f["config"][k][()] for k in f["config"]}
        shape = Shape(**{k: int(cfg[k]) for k in int_keys},
                      tied=bool(cfg["tied"]), norm_topk_prob=bool(cfg["norm_topk_prob"]),
                      capacity_factor=float(cfg["capacity_factor"]),
                      min_capacity=int(cfg["min_capacity"]),
                      aux_loss_coeff=float(cfg["aux_loss_coeff"]),
                      z_loss_coeff=float(cfg["z_loss_coeff"]))
        routing = {}
        if "routing" in f:
            for layer, g in f["routing"].items():
                routing[int(layer)] = {"choice_expert": g["choice_expert"][()],
                                       "choice_kept": g["choice_kept"][()],
                                       "capacity": int(g["capacity"][()])}
        return Export(
            shape=shape,
            params={k: v[()] for k, v in _leaves(f["params"])},
            grads={k: v[()] for k, v in _leaves(f["grads"])},
            inputs=f["inputs"][()], targets=f["targets"][()], logits=f["logits"][()],
            loss=float(f["loss"][()]), ce_loss=float(f["ce_loss"][()]),
            aux_loss=float(f["aux_loss"][()]), z_loss=float(f["z_loss"][()]),
            routing=routing)


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


def gelu_ffn(x, w1, w2):
    return F.gelu(x @ w1.T, approximate="tanh") @ w2.T


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


def route(x, router_w, s):
    """Router decisions and losses for N tokens x[N, C] in groups of G.

    Returns (combine[N, E], info): combine holds each kept choice's gate at
    its expert and zero elsewhere; info has choice_expert, choice_kept,
    capacity, aux_loss, z_loss."""
    N, E, K, G = x.shape[0], s.E, s.K, s.G
    logits = x @ router_w.T                                         # [N, E]
    probs = logits.softmax(-1)
    # A stable descending sort puts the lower expert first among equal
    # probabilities, which is the tie rule.
    choice_expert = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)[1][:, :K]
    gates = probs.gather(1, choice_expert)                          # [N, K]
    if s.norm_topk_prob:
        gates = gates / gates.sum(-1, keepdim=True)

    # Capacity: number the tokens that chose each expert within a group by
    # position (1, 2, ...); those numbered beyond the capacity are dropped.
    # DeepSpeed's floor: never fewer slots than --moe-min-capacity
    capacity = max(expert_capacity(s.capacity_factor, G, K, E), s.min_capacity)
    chose = torch.zeros(N, E, dtype=torch.long).scatter(1, choice_expert, 1)   # [N, E]
    arrival = chose.view(N // G, G, E).cumsum(1).view(N, E)
    kept_at = chose.bool() & (arrival <= capacity)
    choice_kept = kept_at.gather(1, choice_expert)                  # [N, K]
    combine = torch.zeros(N, E, dtype=x.dtype).scatter(1, choice_expert,
                                                       gates * choice_kept.to(x.dtype))

    # Switch load balancing per group: f = share of the group's G*K
    # assignments (before capacity, no gradient), P = mean probability.
    f = chose.view(N // G, G, E).sum(1).to(x.dtype) / (G * K)
    P = probs.view(N // G, G, E).mean(1)
    aux_loss = s.aux_loss_coeff * E * (f * P).sum(-1).mean()
    z_loss = s.z_loss_coeff * logits.logsumexp(-1).pow(2).mean()
    return combine, {"choice_expert": choice_expert, "choice_kept": choice_kept,
                     "capacity": capacity, "aux_loss": aux_loss, "z_loss": z_loss}


def moe_ffn(x, router_w, w1, w2, s):
    combine, info = route(x, router_w, s)
    h = F.gelu(torch.einsum("nc,efc->enf", x, w1), approximate="tanh")
    y = torch.einsum("enf,ecf->enc", h, w2)                         # every expert, every token
    return torch.einsum("ne,enc->nc", combine, y), info


def forward(params, s, inputs, targets):
    """params: name -> float64 tensor (leaves, requires_grad as wanted);
    inputs/targets: [B, T] integer tensors. Returns a dict with loss, ce_loss,
    aux_loss, z_loss (tensors), logits [N, V] and routing {layer: info}."""
    B, T = inputs.shape
    x = (params["wte"][inputs] + params["wpe"][:T]).view(B * T, s.C)
    aux_loss = z_loss = torch.zeros((), dtype=x.dtype)
    routing = {}
    for l in range(s.L):
        p = lambda name: params[f"layers.{l}.{name}"]
        x = x + causal_self_attention(rms_norm(x, p("ln1_w")), p("qkv_w"), p("proj_w"), B, T, s.NH)
        h = rms_norm(x, p("ln2_w"))
        if s.is_moe_layer(l):
            out, info = moe_ffn(h, p("router_w"), p("experts.fc1_w"), p("experts.fc2_w"), s)
            aux_loss = aux_loss + info["aux_loss"]
            z_loss = z_loss + info["z_loss"]
            routing[l] = info
        else:
            out = gelu_ffn(h, p("fc1_w"), p("fc2_w"))
        x = x + out
    lm_head = params["wte"] if s.tied else params["lm_head_w"]
    logits = rms_norm(x, params["lnf_w"]) @ lm_head.T
    ce_loss = F.cross_entropy(logits, targets.reshape(-1))
    return {"loss": ce_loss + aux_loss + z_loss, "ce_loss": ce_loss, "aux_loss": aux_loss,
            "z_loss": z_loss, "logits": logits, "routing": routing}


def reference_step(export):
    """Forward + backward in float64 from the exported float32 weights.
    Returns (forward result, grads as name -> float64 numpy array)."""
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in export.params.items()}
    inputs = torch.tensor(export.inputs, dtype=torch.long)
    targets = torch.tensor(export.targets, dtype=torch.long)
    out = forward(params, export.shape, inputs, targets)
    out["loss"].backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
             for k, p in params.items()}
    return out, grads
