#!/usr/bin/python3
"""torch_peer: moesim's model as a float32 eager PyTorch program, the peer that
`make bench` measures moesim's training throughput against (issue 11).

    /usr/bin/python3 experiments/torch_peer.py --config experiments/small.ini
        [--warmup 2] [--steps 5] [--data corpus|random] [--moesim build/moesim]

Same model, same step as `moesim train` on one rank: token + learned position
embeddings, pre-norm blocks (RMSNorm, causal multi-head attention, FFN), every
--moe-layer-freq-th FFN an MoE layer, final RMSNorm, LM head tied to the token
embedding unless untied, no biases; cross-entropy plus the Switch aux loss and
the z-loss. The MoE layer routes like moesim's topk router: softmax, top-k,
gates renormalised, capacity max(ceil(cf*G*k/E), min capacity) per routing
group (one micro-batch unless --moe-group-size), each expert keeping the
earliest slots that chose it. Kept slots are gathered into one contiguous block
of rows per expert (index_select), each expert is one pair of matmuls over its
block, and the gate-weighted outputs are summed back per token (index_add).
The step is AdamW (decay on matrices), global-norm clipping and moesim's
warm-up + cosine learning rate.

Data (--data): by default the training bytes of the config's text corpus
(--data-path, default the fortunes; each file's first 1 - val-fraction, in
file-name order, as moesim reads it), in windows at uniformly random starts.
The data matters for throughput: text routes unevenly, so capacity drops a
quarter or more of the assignments within a few steps, and dropped
assignments cost no expert FLOPs. `--data random` draws uniform random bytes
instead (few drops: more expert work than moesim does on text).

Timing follows `moesim bench`: warm-up steps, then tokens/s over the timed
steps. One thread, denormals flushed, float32. Torch's matmuls run in the
system OpenBLAS, whose kernel set is fixed when the library loads: unless
OPENBLAS_CORETYPE is given, the peer asks `build/moesim platform` for the
kernel moesim uses and re-executes itself with OPENBLAS_CORETYPE set to it.

Runs only under Debian's /usr/bin/python3 (torch 1.13). Importing the module
(as tests/python/test_torch_peer.py does) re-executes nothing.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_lib.launch import clean_env  # noqa: E402
from sweep_lib.spec import SpecError, normalize_key, read_moesim_ini  # noqa: E402

PYTHON = "/usr/bin/python3"
# Set in the re-executed process: where its OpenBLAS kernel came from. Its
# presence also means "already re-executed", so there is never a second time.
KERNEL_SOURCE_VAR = "MOESIM_PEER_KERNEL_SOURCE"
PLATFORM_KERNEL = re.compile(r"^platform:.*?\bkernel (\w+)", re.M)


def query_moesim_kernel(moesim):
    """(kernel name, None) from `moesim platform`, or (None, why not)."""
    try:
        result = subprocess.run([str(moesim), "platform"], env=clean_env(), capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"cannot run {moesim} platform: {' '.join(str(error).split())}"
    match = PLATFORM_KERNEL.search(result.stdout)
    if result.returncode != 0 or not match:
        said = " ".join((result.stdout + result.stderr).split())[:160]
        return None, f"`{moesim} platform` exited {result.returncode} without a kernel ({said})"
    return match.group(1), None


def ensure_blas_environment(moesim, argv):
    """Before torch (and with it OpenBLAS) loads: one OpenBLAS thread and the
    kernel moesim uses. Re-executes this script once if the environment must
    change; returns where the kernel came from otherwise."""
    if KERNEL_SOURCE_VAR in os.environ:
        return os.environ[KERNEL_SOURCE_VAR]
    changes = {}
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        changes["OPENBLAS_NUM_THREADS"] = "1"
    if os.environ.get("OPENBLAS_CORETYPE"):
        source = "OPENBLAS_CORETYPE given by the caller"
    else:
        kernel, why_not = query_moesim_kernel(moesim)
        if kernel:
            changes["OPENBLAS_CORETYPE"] = kernel
            source = f"chosen by `{moesim} platform`"
        else:
            source = f"OpenBLAS's own choice: {why_not}"
    if not changes:
        return source
    env = {**os.environ, **changes, KERNEL_SOURCE_VAR: source}
    sys.stdout.flush()
    os.execve(PYTHON, [PYTHON, str(Path(__file__).resolve()), *argv], env)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="torch_peer.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a moesim INI file")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (default 2, as moesim bench)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps (default 5, as moesim bench)")
    parser.add_argument("--data", choices=("corpus", "random"), default="corpus",
                        help="the config's text corpus, as moesim trains on (default), or "
                             "uniform random bytes")
    parser.add_argument("--moesim", default=str(REPO / "build" / "moesim"),
                        help="the moesim binary asked for its OpenBLAS kernel "
                             "(default build/moesim of this repository)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    KERNEL_SOURCE = ensure_blas_environment(parse_args(sys.argv[1:]).moesim, sys.argv[1:])

import ctypes  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB_SIZE = 256
INIT_STD = 0.02
RMSNORM_EPS = 1e-5

# moesim's defaults (`moesim --help`) of every key that shapes the model or
# the step; tests/python/test_torch_peer.py holds them to the binary's.
DEFAULTS = {
    "num-layers": "4", "hidden-size": "128", "num-attention-heads": "4",
    "ffn-hidden-size": "512", "seq-length": "128", "untie-embeddings-and-output-weights": "0",
    "dense": "0",
    "num-experts": "8", "moe-router-topk": "2", "moe-layer-freq": "1",
    "moe-ffn-hidden-size": "256", "moe-group-size": "0", "moe-router-norm-topk-prob": "1",
    "moe-expert-capacity-factor": "1.25", "moe-aux-loss-coeff": "0.01",
    "moe-z-loss-coeff": "0.001", "moe-token-drop-policy": "position",
    "moe-router-type": "topk", "moe-router-pre-softmax": "1",
    "moe-router-score-function": "softmax", "moe-router-enable-expert-bias": "0",
    "moe-router-bias-update-rate": "1e-3", "moe-input-jitter-eps": "0",
    "moe-min-capacity": "4", "moe-router-load-balancing-type": "aux_loss",
    "moe-importance-loss-coeff": "0", "moe-load-loss-coeff": "0",
    "moe-expert-activation": "gelu", "moe-shared-expert-intermediate-size": "0",
    "micro-batch-size": "16", "train-iters": "500", "lr-warmup-iters": "50", "lr": "3e-3",
    "min-lr": "3e-4", "weight-decay": "0.1", "clip-grad": "1.0", "adam-beta1": "0.9",
    "adam-beta2": "0.95", "adam-eps": "1e-8", "seed": "1234", "flush-denormals": "1",
    "precision": "fp32", "moe-router-precision": "fp32", "freeze": "",
    "moe-router-num-groups": "0", "moe-router-group-topk": "0", "moe-expert-dropout": "0",
    "init-method-std": "0.02", "moe-hierarchical-groups": "0", "moe-hierarchical-group-topk": "1",
}
DATA_DEFAULTS = {"data-path": "/usr/share/games/fortunes", "data-format": "auto",
                 "val-fraction": "0.1"}
# Keys that do not change one rank's training step (evaluation, output,
# expert parallelism, evaluation-time capacity, the synthetic source, what
# becomes of a step whose loss is not finite, how bf16 products run when the
# peer runs float32 only): read and ignored.
IGNORED_KEYS = {
    "expert-model-parallel-size", "moe-eval-capacity-factor", "eval-interval", "eval-iters",
    "log-interval", "progress-interval", "synthetic-clusters", "synthetic-tokens", "out",
    "record-flush-interval", "save", "save-interval", "save-keep", "load", "finetune",
    "no-load-optim", "overwrite", "skip-nonfinite-steps", "moe-token-dispatcher-type",
    "ranks-per-node", "moe-overlap-chunks", "overlap-grad-reduce", "moe-expert-shadowing",
    "moe-shadow-min-rows",
    "record-group-counts-interval", "bf16-gemm", "bench-warmup-iters", "bench-iters",
}
# Settings of moesim the peer does not implement, with the value it needs.
SUPPORTED_ONLY = {
    "moe-router-type": "topk", "moe-router-score-function": "softmax",
    "moe-router-enable-expert-bias": "0", "moe-input-jitter-eps": "0",
    "moe-token-drop-policy": "position", "moe-importance-loss-coeff": "0",
    "moe-load-loss-coeff": "0", "precision": "fp32", "moe-router-precision": "fp32",
    "freeze": "", "moe-router-num-groups": "0", "moe-router-group-topk": "0",
    "moe-expert-dropout": "0", "init-method-std": "0.02", "moe-hierarchical-groups": "0",
}
BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


class PeerConfigError(Exception):
    """A config the peer cannot run, with the key and the fix."""


class Config:
    """A moesim config: attributes named like the keys with '_' for '-'."""

    def __init__(self, values):
        for key, value in values.items():
            setattr(self, key.replace("-", "_"), value)

    @property
    def tokens_per_step(self):
        return self.micro_batch_size * self.seq_length

    @property
    def routing_group(self):
        return self.moe_group_size or self.tokens_per_step

    def is_moe_layer(self, layer):
        return (not self.dense and self.moe_layer_freq > 0
                and (layer + 1) % self.moe_layer_freq == 0)


def load_config(path=None, **overrides):
    """moesim's defaults, then the INI file at path, then overrides (keys with
    '-' or '_'), checked for what the peer can run."""
    values = {**DEFAULTS, **DATA_DEFAULTS}
    where = path if path is not None else "config"
    if path is not None:
        try:
            values.update(read_moesim_ini(Path(path)))
        except SpecError as error:
            raise PeerConfigError(str(error)) from None
    values.update({normalize_key(k): str(v) for k, v in overrides.items()})
    unknown = sorted(set(values) - set(DEFAULTS) - set(DATA_DEFAULTS) - IGNORED_KEYS)
    if unknown:
        raise PeerConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; the peer knows "
                              "moesim's keys (`moesim --help`)")
    for key, needed in SUPPORTED_ONLY.items():
        if number_or_text(values[key]) != number_or_text(needed):
            raise PeerConfigError(f"{where}: {key} = {values[key]} is not implemented by the "
                                  f"PyTorch peer; it runs {key} = {needed or '(empty)'}")
    if values["moe-router-load-balancing-type"] not in BALANCING_TYPES:
        raise PeerConfigError(f"{where}: moe-router-load-balancing-type = "
                              f"{values['moe-router-load-balancing-type']} is not implemented "
                              f"by the PyTorch peer; use one of {', '.join(BALANCING_TYPES)}")
    cfg = Config({key: number_or_text(value) for key, value in values.items()
                  if key in DEFAULTS or key in DATA_DEFAULTS})
    cfg.data_path = values["data-path"]  # a file name stays text
    if cfg.hidden_size % cfg.num_attention_heads:
        raise PeerConfigError(f"{where}: hidden-size {cfg.hidden_size} is not divisible by "
                              f"num-attention-heads {cfg.num_attention_heads}")
    if cfg.tokens_per_step % cfg.routing_group:
        raise PeerConfigError(f"{where}: moe-group-size {cfg.moe_group_size} does not divide "
                              f"the {cfg.tokens_per_step} tokens of a micro-batch")
    if cfg.moe_router_topk > cfg.num_experts:
        raise PeerConfigError(f"{where}: moe-router-topk {cfg.moe_router_topk} exceeds "
                              f"num-experts {cfg.num_experts}")
    return cfg


def number_or_text(value):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ---- parameters -------------------------------------------------------------


def parameter_shapes(cfg):
    """name -> (shape, init) in moesim's order; init is a normal std, or "ones".
    Experts are separate tensors (`layers.L.experts.E.fc1_w`) so that each
    expert's gradient is its own buffer, as in an nn.ModuleList of experts."""
    C, L, E = cfg.hidden_size, cfg.num_layers, cfg.num_experts
    proj_std = INIT_STD / math.sqrt(2.0 * L)
    w1_units = 2 if cfg.moe_expert_activation == "swiglu" else 1
    shapes = {"wte": ((VOCAB_SIZE, C), INIT_STD), "wpe": ((cfg.seq_length, C), INIT_STD)}
    for layer in range(L):
        p = f"layers.{layer}."
        shapes[p + "ln1_w"] = ((C,), "ones")
        shapes[p + "qkv_w"] = ((3 * C, C), INIT_STD)
        shapes[p + "proj_w"] = ((C, C), proj_std)
        shapes[p + "ln2_w"] = ((C,), "ones")
        if cfg.is_moe_layer(layer):
            shapes[p + "router_w"] = ((E, C), INIT_STD)
            Fs = cfg.moe_shared_expert_intermediate_size
            if Fs > 0:
                shapes[p + "shared_fc1_w"] = ((w1_units * Fs, C), INIT_STD)
                shapes[p + "shared_fc2_w"] = ((C, Fs), proj_std)
            for e in range(E):
                shapes[p + f"experts.{e}.fc1_w"] = ((w1_units * cfg.moe_ffn_hidden_size, C),
                                                    INIT_STD)
                shapes[p + f"experts.{e}.fc2_w"] = ((C, cfg.moe_ffn_hidden_size), proj_std)
        else:
            shapes[p + "fc1_w"] = ((cfg.ffn_hidden_size, C), INIT_STD)
            shapes[p + "fc2_w"] = ((C, cfg.ffn_hidden_size), proj_std)
    shapes["lnf_w"] = ((C,), "ones")
    if cfg.untie_embeddings_and_output_weights:
        shapes["lm_head_w"] = ((VOCAB_SIZE, C), INIT_STD)
    return shapes


def init_params(cfg):
    generator = torch.Generator().manual_seed(cfg.seed)
    params = {}
    for name, (shape, init) in parameter_shapes(cfg).items():
        tensor = (torch.ones(shape) if init == "ones"
                  else torch.randn(shape, generator=generator) * init)
        params[name] = tensor.requires_grad_()
    return params


def count_params(cfg):
    return sum(math.prod(shape) for shape, _ in parameter_shapes(cfg).values())


# ---- forward ----------------------------------------------------------------


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS) * w


def ffn(x, w1, w2, activation):
    h = F.linear(x, w1)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h, approximate="tanh")
    return F.linear(h, w2)


def causal_mask(T):
    """Additive [T, T] mask: 0 on and below the diagonal, -inf above."""
    return torch.full((T, T), float("-inf")).triu_(1)


def attention(x, qkv_w, proj_w, mask, B, T, NH):
    C = x.shape[-1]
    hs = C // NH
    qkv = F.linear(x, qkv_w).view(B, T, 3, NH, hs).permute(2, 0, 3, 1, 4)  # [3, B, NH, T, hs]
    q, k, v = (t.reshape(B * NH, T, hs) for t in qkv.unbind(0))
    # scale, mask and scores in one batched sgemm (beta = 1 onto the mask)
    scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs))
    y = torch.bmm(scores.softmax(-1), v)                                    # [B*NH, T, hs]
    return F.linear(y.view(B, NH, T, hs).transpose(1, 2).reshape(B * T, C), proj_w)


def expert_capacity(cfg, capacity_factor):
    """moesim's router_capacity: ceil(cf*G*k/E) (an exact product does not
    round up), at least 1, then at least --moe-min-capacity."""
    exact = capacity_factor * cfg.routing_group * cfg.moe_router_topk / cfg.num_experts
    return max(math.ceil(exact - 1e-9 * exact), 1, cfg.moe_min_capacity)


def moe_layer(h, params, prefix, cfg):
    """(output [N, C], aux loss, z loss, kept assignments) of one MoE layer
    on h [N, C]."""
    N, E, K, G = h.shape[0], cfg.num_experts, cfg.moe_router_topk, cfg.routing_group
    logits = F.linear(h, params[prefix + "router_w"])                      # [N, E]
    probs = logits.softmax(-1)
    gates, chosen = probs.topk(K, dim=-1)                                   # [N, K], best first
    if cfg.moe_router_norm_topk_prob or not cfg.moe_router_pre_softmax:
        gates = gates / gates.sum(-1, keepdim=True)
    slot_expert = chosen.reshape(-1)                                        # slot t*K+k

    # Drop by position: in each group, number each expert's slots in slot
    # order; those beyond the capacity are dropped.
    if cfg.moe_expert_capacity_factor > 0:
        per_group = slot_expert.view(N // G, G * K)
        arrival = F.one_hot(per_group, E).cumsum(1).gather(2, per_group.unsqueeze(2))
        kept_slots = (arrival.view(-1) <= expert_capacity(cfg, cfg.moe_expert_capacity_factor)
                      ).nonzero().squeeze(1)
    else:
        kept_slots = torch.arange(N * K)
    # One block of rows per expert, in token order within it.
    kept_expert = slot_expert[kept_slots]
    kept_expert, order = torch.sort(kept_expert, stable=True)
    slots = kept_slots[order]
    rows = slots // K
    rows_per_expert = torch.bincount(kept_expert, minlength=E).tolist()
    expert_in = h.index_select(0, rows)
    outs = [ffn(x_e, params[prefix + f"experts.{e}.fc1_w"], params[prefix + f"experts.{e}.fc2_w"],
                cfg.moe_expert_activation)
            for e, x_e in enumerate(expert_in.split(rows_per_expert)) if x_e.shape[0]]
    y = torch.cat(outs) * gates.reshape(-1).index_select(0, slots).unsqueeze(1)
    out = h.new_zeros(h.shape).index_add(0, rows, y)
    if cfg.moe_shared_expert_intermediate_size > 0:
        out = out + ffn(h, params[prefix + "shared_fc1_w"], params[prefix + "shared_fc2_w"],
                        cfg.moe_expert_activation)

    # Switch: coeff * E * sum_e f_e * P_e per balancing unit, f from the
    # choices before capacity (no gradient), averaged over units.
    aux_loss = logits.new_zeros(())
    if cfg.moe_router_load_balancing_type != "none":
        unit_tokens = cfg.seq_length if cfg.moe_router_load_balancing_type == "seq_aux_loss" else G
        units = N // unit_tokens
        slot_unit = torch.arange(N * K) // (unit_tokens * K)
        f = torch.bincount(slot_unit * E + slot_expert, minlength=units * E).view(units, E)
        P = probs.view(units, unit_tokens, E).mean(1)
        aux_loss = cfg.moe_aux_loss_coeff * E * (f.to(P.dtype) / (unit_tokens * K) * P).sum(
            -1).mean()
    z_loss = cfg.moe_z_loss_coeff * logits.logsumexp(-1).pow(2).mean()
    return out, aux_loss, z_loss, slots.numel()


def forward(params, cfg, inputs, targets, mask=None):
    """Losses of one micro-batch: inputs and targets [B, T] int64. Returns a
    dict of 0-d tensors: loss (what is minimised), ce_loss, aux_loss, z_loss;
    and the counts assignments and kept (after capacity), over MoE layers."""
    B, T = inputs.shape
    C = cfg.hidden_size
    mask = causal_mask(T) if mask is None else mask
    x = (params["wte"][inputs] + params["wpe"][:T]).view(B * T, C)
    aux_loss = z_loss = x.new_zeros(())
    assignments = kept = 0
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        x = x + attention(rms_norm(x, params[p + "ln1_w"]), params[p + "qkv_w"],
                          params[p + "proj_w"], mask, B, T, cfg.num_attention_heads)
        h = rms_norm(x, params[p + "ln2_w"])
        if cfg.is_moe_layer(layer):
            out, aux, z, layer_kept = moe_layer(h, params, p, cfg)
            aux_loss, z_loss = aux_loss + aux, z_loss + z
            assignments += B * T * cfg.moe_router_topk
            kept += layer_kept
        else:
            out = ffn(h, params[p + "fc1_w"], params[p + "fc2_w"], "gelu")
        x = x + out
    lm_head = params["lm_head_w"] if cfg.untie_embeddings_and_output_weights else params["wte"]
    logits = F.linear(rms_norm(x, params["lnf_w"]), lm_head)
    ce_loss = F.cross_entropy(logits, targets.reshape(-1))
    return {"loss": ce_loss + aux_loss + z_loss, "ce_loss": ce_loss, "aux_loss": aux_loss,
            "z_loss": z_loss, "assignments": assignments, "kept": kept}


# ---- data ---------------------------------------------------------------------


def data_source(cfg):
    """"text" when moesim would read the config's data-path as text, else
    moesim's other source ("synthetic" or "tokens")."""
    if cfg.data_format in ("text", "tokens", "synthetic"):
        return cfg.data_format
    if cfg.data_path == "synthetic":
        return "synthetic"
    return "tokens" if cfg.data_path.endswith(".tok") else "text"


def text_files(cfg):
    """The files of a text corpus as moesim reads them: the data-path, or a
    directory's regular, non-empty, non-hidden, non-*.dat files (no
    symlinks), in name order."""
    path = Path(cfg.data_path)
    if not path.is_dir():
        return [path]
    return sorted((f for f in path.iterdir()
                   if not f.name.startswith(".") and not f.name.endswith(".dat")
                   and not f.is_symlink() and f.is_file() and f.stat().st_size > 0),
                  key=lambda f: os.fsencode(f.name))


def text_training_bytes(cfg):
    """The training stream of a text corpus as moesim builds it: each file's
    bytes but its last val-fraction, in file order."""
    parts = []
    for path in text_files(cfg):
        data = path.read_bytes()
        n = len(data)
        held_out = math.floor(n * cfg.val_fraction + 1e-6)
        if n >= 2:
            held_out = min(max(held_out, 1), n - 1)
        else:
            held_out = 0
        parts.append(data[:n - held_out])
    stream = b"".join(parts)
    if len(stream) < cfg.seq_length + 1:
        raise PeerConfigError(f"data-path {cfg.data_path} holds {len(stream)} training bytes, "
                              f"fewer than seq-length + 1 = {cfg.seq_length + 1}")
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8)


# ---- training -----------------------------------------------------------------


def lr_at_step(step, cfg):
    """moesim's schedule: linear warm-up, then cosine decay to min-lr."""
    warmup, total = cfg.lr_warmup_iters, cfg.train_iters
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_steps = total - warmup - 1
    if decay_steps <= 0:
        return cfg.lr
    progress = min((step - warmup) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """The peer of one moesim rank: parameters, AdamW (decay on matrices
    only) and the step."""

    def __init__(self, cfg, data="corpus"):
        """data: "corpus" (the config's text corpus; uniform random bytes for
        moesim's synthetic source) or "random" (uniform random bytes)."""
        self.cfg = cfg
        if data == "corpus" and data_source(cfg) == "tokens":
            raise PeerConfigError(f"data-path {cfg.data_path}: token files are not implemented "
                                  "by the PyTorch peer; use a text corpus or --data random")
        self.corpus = (text_training_bytes(cfg)
                       if data == "corpus" and data_source(cfg) == "text" else None)
        self.params = init_params(cfg)
        self.mask = causal_mask(cfg.seq_length)
        decay = [p for p in self.params.values() if p.dim() > 1]
        no_decay = [p for p in self.params.values() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=True)
        self.data = torch.Generator().manual_seed(cfg.seed + 1)
        self.step_index = 0
        self.assignments = self.kept = 0  # summed over steps

    def data_description(self):
        return ("uniform random bytes" if self.corpus is None
                else f"{self.cfg.data_path}, {self.corpus.numel()} training bytes")

    def random_batch(self):
        """Inputs and targets [B, T]: windows of the corpus at uniformly
        random starts, or uniform random bytes."""
        B, T = self.cfg.micro_batch_size, self.cfg.seq_length
        if self.corpus is None:
            tokens = torch.randint(VOCAB_SIZE, (B, T + 1), generator=self.data)
        else:
            starts = torch.randint(self.corpus.numel() - T, (B, 1), generator=self.data)
            tokens = self.corpus[starts + torch.arange(T + 1)].long()
        return tokens[:, :-1], tokens[:, 1:]

    def step(self, inputs=None, targets=None):
        """One optimizer step on the given batch (a random one by default);
        returns the loss before the update."""
        if inputs is None:
            inputs, targets = self.random_batch()
        self.optimizer.zero_grad(set_to_none=True)
        result = forward(self.params, self.cfg, inputs, targets, self.mask)
        self.assignments += result["assignments"]
        self.kept += result["kept"]
        loss = result["loss"]
        loss.backward()
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.clip_grad)
        lr = lr_at_step(self.step_index, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_index += 1
        return loss.item()


# ---- the benchmark ------------------------------------------------------------


def openblas_in_process():
    """(path, version + config, kernel name) of the OpenBLAS this process loaded."""
    library = ctypes.CDLL("libopenblas.so.0")
    library.openblas_get_corename.restype = ctypes.c_char_p
    library.openblas_get_config.restype = ctypes.c_char_p
    library.openblas_set_num_threads(1)
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line and "/" in line}
    return (", ".join(sorted(paths)), library.openblas_get_config().decode().strip(),
            library.openblas_get_corename().decode())


def main(argv, kernel_source):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except PeerConfigError as error:
        print(f"torch_peer: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    flushing = torch.set_flush_denormal(bool(cfg.flush_denormals))
    name = Path(args.config).name
    openblas_path, openblas_config, kernel = openblas_in_process()
    requested = os.environ.get("OPENBLAS_CORETYPE", "")
    if requested and requested.lower() != kernel.lower():
        kernel_source += f"; OPENBLAS_CORETYPE={requested} was NOT applied"
    print(f"torch_peer: {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, expert ffn "
          f"{cfg.moe_ffn_hidden_size}, {cfg.num_experts} experts top-{cfg.moe_router_topk}, seq "
          f"{cfg.seq_length}, micro-batch {cfg.micro_batch_size}, {count_params(cfg)} parameters")
    print(f"torch_peer: PyTorch {torch.__version__} eager float32, {torch.get_num_threads()} "
          f"thread, denormals {'flushed' if flushing else 'kept (IEEE)'}; "
          f"OpenBLAS kernel {kernel} ({kernel_source}); {openblas_config}; {openblas_path}")
    sys.stdout.flush()
    try:
        trainer = Trainer(cfg, args.data)
    except (PeerConfigError, OSError) as error:
        print(f"torch_peer: error: {error}", file=sys.stderr)
        return 2
    print(f"torch_peer: data: {trainer.data_description()}", flush=True)
    losses = [trainer.step() for _ in range(args.warmup)]
    trainer.assignments = trainer.kept = 0
    seconds = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(trainer.step())
        seconds += time.perf_counter() - start
    tokens = cfg.tokens_per_step * args.steps
    dropped = 1 - trainer.kept / trainer.assignments if trainer.assignments else 0.0
    print(f"torch_peer: step {seconds / args.steps:.3f} s | {tokens / seconds:.0f} tokens/s | "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({args.warmup} warm-up + {args.steps} "
          f"timed steps) | dropped {dropped:.3f} of the expert assignments | kernel {kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], KERNEL_SOURCE))
