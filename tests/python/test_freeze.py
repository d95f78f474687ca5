"""--freeze (ST-MoE's fine-tuning study): a fine-tune from a checkpoint with
--freeze moe ends with router and expert tensors bit-equal to the ones it
loaded while everything else trained, on any layout; a resumed run keeps a
frozen tensor's Adam moments as the checkpoint holds them.

Tiny model, a few steps: every run takes about a second."""
import shutil

import h5py
import numpy as np
import pytest

from moesim_run import BUILD, final_checkpoint, run_moesim, run_mpi

SEQ = 16
TINY = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64,
    "eval-interval": 1000, "eval-iters": 1, "log-interval": 1, "progress-interval": 1000,
    "data-format": "synthetic", "synthetic-tokens": 20000, "moe-group-size": SEQ,
    "lr-warmup-iters": 2, "moe-shared-expert-intermediate-size": 16,
    "moe-router-enable-expert-bias": 1,
}
GLOBAL_BATCH = 4
PRETRAIN_STEPS = 10
TIMEOUT = 120

needs_moesim = pytest.mark.skipif(not (BUILD / "moesim").exists(),
                                  reason=f"no {BUILD / 'moesim'}; `make build/moesim` first")
pytestmark = needs_moesim


def train(world, out, save, **extra):
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // world,
               "expert-model-parallel-size": world, "out": out, "save": save, **extra}
    result = (run_moesim("train", options, timeout=TIMEOUT) if world == 1
              else run_mpi(world, "train", options, timeout=TIMEOUT))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def tensors(path, group):
    """name -> array of one group (params, adam_m, adam_v, expert_bias)."""
    with h5py.File(path, "r") as f:
        return {name: f[group][name][()] for name in f[group]}


def is_moe(name):
    return name.endswith((".router_w", ".shared_fc1_w", ".shared_fc2_w")) or ".experts." in name


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-step run with checkpoints at steps 5 and 10."""
    d = tmp_path_factory.mktemp("pretrained")
    train(1, d / "run.h5", d / "ckpt", **{"train-iters": PRETRAIN_STEPS, "save-interval": 5})
    return d


@pytest.mark.parametrize("world", [1, 2])
def test_finetune_with_frozen_moe_keeps_router_and_experts(pretrained, tmp_path, world):
    save = tmp_path / "ckpt"
    output = train(world, tmp_path / "run.h5", save, load=pretrained / "ckpt", finetune=1,
                   freeze="moe", **{"train-iters": 4})
    assert "frozen: moe" in output, output
    loaded = final_checkpoint(pretrained / "ckpt")
    before, after = tensors(loaded, "params"), tensors(final_checkpoint(save), "params")
    assert before.keys() == after.keys()
    frozen = sorted(name for name in before if is_moe(name))
    assert any(".router_w" in n for n in frozen) and any(".experts." in n for n in frozen)
    for name in before:
        same = np.array_equal(before[name], after[name])
        assert same == is_moe(name), f"{name}: {'unchanged' if same else 'changed'}"
    # A fine-tune starts Adam anew: the frozen tensors' moments stay zero.
    moments = tensors(final_checkpoint(save), "adam_v")
    for name in frozen:
        assert not moments[name].any(), name
    assert np.array_equal(tensors(loaded, "expert_bias")["layers.1"],
                          tensors(final_checkpoint(save), "expert_bias")["layers.1"])


def test_finetune_with_frozen_moe_is_the_same_on_every_layout(pretrained, tmp_path):
    finals = []
    for world in (1, 2):
        save = tmp_path / f"ckpt{world}"
        train(world, tmp_path / f"run{world}.h5", save, load=pretrained / "ckpt", finetune=1,
              freeze="moe", **{"train-iters": 4})
        finals.append(final_checkpoint(save))
    for group in ("params", "adam_m", "adam_v", "expert_bias"):
        one, two = tensors(finals[0], group), tensors(finals[1], group)
        assert one.keys() == two.keys()
        for name in one:
            assert np.array_equal(one[name], two[name]), f"{group}/{name}"


def test_resume_keeps_the_loaded_moments_of_frozen_tensors(pretrained, tmp_path):
    """Resuming at step 5 with --freeze experts: the experts' parameters and
    Adam moments at step 10 are the checkpoint's of step 5."""
    save = tmp_path / "ckpt"
    save.mkdir()
    name = "iter_0000005.h5"
    shutil.copy(pretrained / "ckpt" / name, save / name)
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    out = tmp_path / "run.h5"
    shutil.copy(pretrained / "run.h5", out)
    train(1, out, save, load=save, freeze="experts", **{"train-iters": PRETRAIN_STEPS})
    final = final_checkpoint(save)
    assert final.name == "iter_0000010.h5"
    experts = [n for n in tensors(final, "params") if ".experts." in n or ".shared_fc" in n]
    assert experts
    for group in ("params", "adam_m", "adam_v"):
        loaded, ended = tensors(save / name, group), tensors(final, group)
        for n in loaded:
            frozen = n in experts
            assert np.array_equal(loaded[n], ended[n]) == frozen, f"{group}/{n}"
            if frozen and group != "params":
                assert loaded[n].any(), f"{group}/{n}: the loaded moments are not zero"
