"""The PyTorch peer of `make bench` (experiments/torch_peer.py) is moesim's
model: the same keys and defaults, the same parameters, the same losses and
gradients as the float64 reference the C model is held to (torch_moe), it
learns, and the script picks and reports its OpenBLAS kernel."""
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import torch_moe
from moesim_run import BUILD, clean_env, run_moesim

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
import torch_peer  # noqa: E402

PEER = REPO / "experiments" / "torch_peer.py"
HELP_DEFAULT = re.compile(r"^\s+--([a-z0-9][a-z0-9-]*)\s.*\(default ([^)]*)\)$")
TINY = {"num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "ffn-hidden-size": 48,
        "seq-length": 16, "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 24,
        "micro-batch-size": 4, "seed": 7}
# Every MoE option the peer implements, away from its default.
VARIANT = {**TINY, "num-layers": 3, "moe-layer-freq": 2, "untie-embeddings-and-output-weights": 1,
           "moe-expert-activation": "swiglu", "moe-shared-expert-intermediate-size": 16,
           "moe-group-size": 32, "moe-router-norm-topk-prob": 0}

needs_moesim = pytest.mark.skipif(not (BUILD / "moesim").exists(),
                                  reason=f"no {BUILD / 'moesim'}; `make build/moesim` first")


@needs_moesim
def test_keys_and_defaults_are_moesims():
    help_text = subprocess.run([str(BUILD / "moesim"), "--help"], env=clean_env(),
                               capture_output=True, text=True, timeout=60).stdout
    defaults = {m.group(1): m.group(2) for line in help_text.splitlines()
                if (m := HELP_DEFAULT.match(line))}
    known = {**torch_peer.DEFAULTS, **torch_peer.DATA_DEFAULTS}
    # Every key of moesim is one the peer follows or knows not to matter (the
    # peer may know a key a binary built before it does not have yet).
    assert set(defaults) - torch_peer.IGNORED_KEYS <= set(known)
    common = set(defaults) & set(known)
    assert {key: torch_peer.number_or_text(defaults[key]) for key in common} == \
        {key: torch_peer.number_or_text(known[key]) for key in common}


@needs_moesim
@pytest.mark.parametrize("config", ["small.ini", "variant"])
def test_parameter_count_is_moesims(tmp_path, config):
    """small.ini on its own corpus (the fortunes): also the same data files."""
    if config == "variant":
        options = {**VARIANT, "data-format": "synthetic", "synthetic-tokens": 20000}
        cfg = torch_peer.load_config(**VARIANT)
    else:
        options = {"config": REPO / "experiments" / config}
        cfg = torch_peer.load_config(REPO / "experiments" / config)
    out = tmp_path / "run.h5"
    result = run_moesim("train", {**options, "train-iters": 1, "eval-iters": 1, "out": out},
                        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out, "r") as f:
        params_total = int(f.attrs["params_total"])
        categories = [name.decode() if isinstance(name, bytes) else name
                      for name in f.attrs["category_names"]]
    assert torch_peer.count_params(cfg) == params_total
    if config == "variant":
        assert sum(p.numel() for p in torch_peer.init_params(cfg).values()) == params_total
    else:
        assert [path.name for path in torch_peer.text_files(cfg)] == categories


def test_text_corpus_is_read_as_moesim_reads_it(tmp_path):
    (tmp_path / "b").write_bytes(bytes(range(100)))
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "a.dat").write_bytes(b"index")
    (tmp_path / ".hidden").write_bytes(b"hidden")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "b.u8").symlink_to(tmp_path / "b")
    cfg = torch_peer.load_config(**TINY, **{"data-path": tmp_path, "val-fraction": 0.25})
    assert [path.name for path in torch_peer.text_files(cfg)] == ["a", "b"]
    # each file's last quarter (floor, at least one byte) is validation
    assert bytes(torch_peer.text_training_bytes(cfg).tolist()) == b"x" * 8 + bytes(range(75))
    inputs, targets = torch_peer.Trainer(cfg).random_batch()
    assert inputs.shape == targets.shape == (cfg.micro_batch_size, cfg.seq_length)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def reference_shape(cfg):
    return torch_moe.Shape(
        V=torch_peer.VOCAB_SIZE, T=cfg.seq_length, C=cfg.hidden_size,
        NH=cfg.num_attention_heads, L=cfg.num_layers, F=cfg.ffn_hidden_size, E=cfg.num_experts,
        K=cfg.moe_router_topk, Fe=cfg.moe_ffn_hidden_size, G=cfg.routing_group,
        B=cfg.micro_batch_size, moe_layer_freq=cfg.moe_layer_freq,
        tied=not cfg.untie_embeddings_and_output_weights,
        norm_topk_prob=bool(cfg.moe_router_norm_topk_prob),
        capacity_factor=cfg.moe_expert_capacity_factor, min_capacity=cfg.moe_min_capacity,
        aux_loss_coeff=cfg.moe_aux_loss_coeff, z_loss_coeff=cfg.moe_z_loss_coeff)


def reference_params(peer_params, cfg):
    """The peer's float32 parameters in torch_moe's layout (experts stacked),
    as float64 leaves."""
    params = {}
    for name, tensor in peer_params.items():
        layer, _, rest = name.partition(".experts.")
        if rest:
            params.setdefault(f"{layer}.experts.{rest.split('.')[1]}", []).append(tensor.detach())
        else:
            params[name] = tensor.detach()
    return {name: (torch.stack(value) if isinstance(value, list) else value)
            .double().requires_grad_() for name, value in params.items()}


@pytest.mark.parametrize("overrides", [
    {},  # every layer MoE, tied head, one routing group
    {"num-layers": 3, "moe-layer-freq": 2, "untie-embeddings-and-output-weights": 1,
     "moe-group-size": 32, "moe-router-norm-topk-prob": 0},
], ids=["default", "dense_untied_groups"])
def test_losses_and_gradients_match_the_float64_reference(overrides):
    # Tight capacity (drops happen) and loss coefficients large enough to
    # show in the gradients. Float32 against float64 agrees to about 1e-6; a
    # wrong detail (say erf GELU for tanh GELU) is off by 1e-4 or more.
    cfg = torch_peer.load_config(**{
        **TINY, **overrides, "moe-expert-capacity-factor": 1.0, "moe-min-capacity": 1,
        "moe-aux-loss-coeff": 0.1, "moe-z-loss-coeff": 0.01})
    params = torch_peer.init_params(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms away from 1, activations of order 1, routers decisive
        for name, p in params.items():
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=generator) if p.dim() == 1 else
                   (20.0 if "router_w" in name else 5.0))
    tokens = torch.randint(256, (cfg.micro_batch_size, cfg.seq_length + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    ours = torch_peer.forward(params, cfg, inputs, targets)
    ours["loss"].backward()
    ref_params = reference_params(params, cfg)
    ref = torch_moe.forward(ref_params, reference_shape(cfg), inputs, targets)
    ref["loss"].backward()

    assert any(not info["choice_kept"].all() for info in ref["routing"].values()), \
        "no token was dropped: the test does not exercise the capacity"
    for key in ("loss", "ce_loss", "aux_loss", "z_loss"):
        assert float(ours[key]) == pytest.approx(float(ref[key]), rel=2e-6), key
    ref_grads = reference_params({name: torch.zeros_like(p) if p.grad is None else p.grad
                                  for name, p in params.items()}, cfg)
    for name, ref_param in ref_params.items():
        ours_grad, ref_grad = ref_grads[name].double(), ref_param.grad
        scale = ref_grad.abs().max().item()
        assert scale > 0, name
        assert (ours_grad - ref_grad).abs().max().item() <= 2e-5 * scale, name


def test_training_lowers_the_loss():
    cfg = torch_peer.load_config(**TINY, **{"lr": 1e-2, "lr-warmup-iters": 1})
    trainer = torch_peer.Trainer(cfg, data="random")
    inputs, targets = trainer.random_batch()
    losses = [trainer.step(inputs, targets) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_unsupported_settings_are_refused():
    with pytest.raises(torch_peer.PeerConfigError, match="moe-router-type = switch"):
        torch_peer.load_config(**TINY, **{"moe-router-type": "switch"})
    with pytest.raises(torch_peer.PeerConfigError, match="unknown key"):
        torch_peer.load_config(**TINY, **{"num-layer": 3})


def run_peer(tmp_path, moesim, **env):
    ini = tmp_path / "tiny.ini"
    ini.write_text("".join(f"{key} = {value}\n" for key, value in TINY.items()))
    environment = {k: v for k, v in clean_env().items()
                   if k not in ("OPENBLAS_CORETYPE", torch_peer.KERNEL_SOURCE_VAR)}
    environment.pop("OPENBLAS_NUM_THREADS")  # the peer must set it itself
    result = subprocess.run(["/usr/bin/python3", str(PEER), "--config", str(ini), "--warmup", "1",
                             "--steps", "2", "--moesim", str(moesim)],
                            env={**environment, **env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_moesim
def test_script_uses_the_kernel_moesim_reports(tmp_path):
    # as the peer asks it: with no kernel forced (a shell may preset one)
    env = {k: v for k, v in clean_env().items() if k != "OPENBLAS_CORETYPE"}
    platform = subprocess.run([str(BUILD / "moesim"), "platform"], env=env,
                              capture_output=True, text=True, timeout=60)
    kernel = torch_peer.PLATFORM_KERNEL.search(platform.stdout)
    if platform.returncode != 0 or not kernel:
        pytest.skip(f"{BUILD / 'moesim'} has no `platform` subcommand yet")
    out = run_peer(tmp_path, BUILD / "moesim")
    used = re.search(r"OpenBLAS kernel (\w+) \(chosen by [^;]*;", out)
    assert used and used.group(1).lower() == kernel.group(1).lower(), out
    assert re.search(r"^torch_peer: step [0-9.]+ s \| [0-9]+ tokens/s", out, re.M), out
    assert "1 thread, denormals flushed" in out, out


def test_script_falls_back_to_openblas_choice(tmp_path):
    out = run_peer(tmp_path, tmp_path / "no-moesim")
    assert "(OpenBLAS's own choice: cannot run" in out, out
    assert re.search(r"^torch_peer: step [0-9.]+ s \| [0-9]+ tokens/s", out, re.M), out
