"""The model really learns: on the default corpus (Debian fortunes) a small
config's validation loss after 200 steps is below 0.8x its first value."""
import h5py

from moesim_run import run_moesim

SMALL = {
    "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "ffn-hidden-size": 256,
    "seq-length": 64, "micro-batch-size": 8, "num-experts": 4, "moe-router-topk": 2,
    "moe-ffn-hidden-size": 128, "train-iters": 200, "eval-interval": 200, "eval-iters": 8,
    "lr-warmup-iters": 20, "progress-interval": 50,
}


def test_validation_loss_falls_below_80_percent_in_200_steps(tmp_path):
    out = tmp_path / "learn.h5"
    result = run_moesim("train", {**SMALL, "out": out})
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"
        steps = list(f["eval/step"][:])
        losses = list(f["eval/loss"][:])
        train_loss = f["train/loss"][:]
        tokens_per_expert = f["routing/tokens_per_expert"][:]
    assert steps == [0, 200]
    print(f"validation loss {losses[0]:.4f} -> {losses[1]:.4f} "
          f"(ratio {losses[1] / losses[0]:.3f})")
    assert losses[1] < 0.8 * losses[0]
    assert len(train_loss) == 200
    # top-2 over 64 tokens x 8 sequences: 1024 assignments per layer per step
    assert (tokens_per_expert.sum(axis=2) == 2 * 8 * 64).all()
