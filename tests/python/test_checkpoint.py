"""Checkpoints and resume (issue 13): a run killed at any step and resumed on
any layout ends with a record and a final checkpoint bit-identical to the
uninterrupted run; a damaged latest checkpoint falls back to the previous one;
a checkpoint of another model is refused naming the tensor.

Every run has a timeout, so no test can hang."""
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from moesim_run import (BUILD, clean_env, final_checkpoint, flags, rank_pids, run_moesim,
                        run_mpi, moesim_info)

SEQ = 16
STEPS = 200
TINY = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": SEQ,
    "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64,
    "train-iters": STEPS, "eval-interval": 50, "eval-iters": 1, "log-interval": 1,
    "progress-interval": 1000, "data-format": "synthetic", "synthetic-tokens": 20000,
    "moe-group-size": SEQ, "lr-warmup-iters": 5, "moe-expert-capacity-factor": 1.0,
    "save-interval": 5,
}
GLOBAL_BATCH = 12
TIMEOUT = 120
# Layout-dependent by design: timings, throughput, traffic, and the restarts;
# and a checkpoint's copy of the record, which holds them (the record itself
# is compared).
NOT_COMPARED = ("timing/", "traffic/", "resumes/", "train/step_time_s", "train/tokens_per_s",
                "run_record")


def run(world, ep, out, save, **extra):
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // world,
               "expert-model-parallel-size": ep, "out": out, "save": save, **extra}
    if world == 1:
        return run_moesim("train", options, timeout=TIMEOUT)
    return run_mpi(world, "train", options, timeout=TIMEOUT)


def datasets(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same(reference, other, what):
    a, b = datasets(reference), datasets(other)
    compared = [k for k in a if not k.startswith(NOT_COMPARED)]
    assert compared, f"{what}: nothing to compare"
    for k in compared:
        assert k in b, f"{what}: {k} missing"
        assert a[k].shape == b[k].shape, f"{what}: {k} shape {a[k].shape} vs {b[k].shape}"
        assert np.array_equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    result = run(2, 2, d / "run.h5", d / "ckpt")
    assert result.returncode == 0, result.stdout + result.stderr
    return d


def kill_after_checkpoint(world, ep, out, save, at_least):
    """Starts the run and SIGKILLs it once `save` names a checkpoint at or
    past step `at_least`; returns the latest checkpoint's step then."""
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // world,
               "expert-model-parallel-size": ep, "out": out, "save": save}
    cmd = ["mpirun", "-n", str(world), "--oversubscribe", "--bind-to", "none",
           str(BUILD / "moesim"), "train", *flags(options)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = Path(save) / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if latest.exists() and latest.read_text().strip() and \
                    int(latest.read_text()) >= at_least:
                break
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        # SIGKILL leaves mpirun no chance to stop its ranks: kill them too,
        # found by the run's unique --out path
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
        for _ in range(100):
            if subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode:
                break
            time.sleep(0.05)
    return int(latest.read_text())


# The uninterrupted run is 2 ranks, EP 2; each kill lands a few steps after
# the given checkpoint (the schedule is the same: --train-iters is part of the
# experiment), and the resume runs on another layout to the end: the record
# rows after the checkpoint are dropped and recomputed.
@pytest.mark.parametrize("first,resume,at_least", [((2, 2), (1, 1), 10), ((1, 1), (4, 2), 60),
                                                   ((4, 4), (3, 1), 120)],
                         ids=["2ep2-to-1", "1-to-4ep2", "4ep4-to-3"])
def test_killed_run_resumes_on_another_layout_bit_identical(uninterrupted, tmp_path, first,
                                                            resume, at_least):
    out, save = tmp_path / "run.h5", tmp_path / "ckpt"
    step = kill_after_checkpoint(*first, out, save, at_least)
    assert step >= at_least
    if step >= STEPS:
        pytest.skip(f"the kill came after step {STEPS}")
    # the killed run's --train-iters was larger: resume with the reference's
    result = run(*resume, out, save, load=save)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"resumed from {save} at step {step}" in output, output
    assert_same(uninterrupted / "run.h5", out, "record")
    assert_same(final_checkpoint(uninterrupted / "ckpt"), final_checkpoint(save),
                "final checkpoint")
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"
        assert list(f["resumes/step"][()]) == [step]
        assert list(f["resumes/world_size"][()]) == [resume[0]]


@pytest.mark.parametrize("damage", ["truncated", "zero-filled"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, damage):
    save = tmp_path / "ckpt"
    save.mkdir()
    for step in (STEPS - 10, STEPS - 5):
        (save / f"iter_{step:07d}.h5").write_bytes(
            (uninterrupted / "ckpt" / f"iter_{step:07d}.h5").read_bytes())
    (save / "latest_checkpointed_iteration.txt").write_text(f"{STEPS - 5}\n")
    bad = save / f"iter_{STEPS - 5:07d}.h5"
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes()[: size // 3] if damage == "truncated" else bytes(size))
    out = tmp_path / "run.h5"
    out.write_bytes((uninterrupted / "run.h5").read_bytes())
    result = run(2, 2, out, save, load=save)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"checkpoint {STEPS - 5} in" in output, output
    assert f"resumed from checkpoint {STEPS - 10} instead" in output, output
    assert_same(uninterrupted / "run.h5", out, "record")
    assert_same(final_checkpoint(uninterrupted / "ckpt"), final_checkpoint(save),
                "final checkpoint")


def save_dir_at(uninterrupted, tmp_path, step):
    """A --save directory whose latest checkpoint is the uninterrupted run's at step."""
    save = tmp_path / "ckpt"
    save.mkdir()
    name = f"iter_{step:07d}.h5"
    (save / name).write_bytes((uninterrupted / "ckpt" / name).read_bytes())
    (save / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")
    return save


def test_checkpoint_carries_the_record_as_of_its_step(uninterrupted, tmp_path):
    step = STEPS - 10
    with h5py.File(uninterrupted / "ckpt" / f"iter_{step:07d}.h5", "r") as f:
        image = f["run_record"][()].tobytes()
    path = tmp_path / "image.h5"
    path.write_bytes(image)
    with h5py.File(path, "r") as f, h5py.File(uninterrupted / "run.h5", "r") as g:
        assert f.attrs["steps_done"] == step and f.attrs["status"] == "running"
        assert f.attrs["run_id"] == g.attrs["run_id"] and len(g.attrs["run_id"]) == 16
        assert list(f["train/step"][()]) == list(range(1, step + 1))
        assert np.array_equal(f["train/loss"][()], g["train/loss"][:step])
        assert np.array_equal(f["routing/tokens_per_expert"][()],
                              g["routing/tokens_per_expert"][:step])


@pytest.mark.parametrize("left", ["damaged", "missing", "intact, checkpoint without image"])
def test_resume_restores_the_record_saved_with_the_checkpoint(uninterrupted, tmp_path, left):
    """A SIGKILL inside a record flush can leave a record whose superblock
    claims an end of file that was never written (HDF5 cannot open it), or
    one that opens but fails at the next write. The resume restores the copy
    the checkpoint carries and ends as the uninterrupted run; a damaged file
    is kept aside, never deleted. A checkpoint of an older moesim, without
    the copy, continues the record in place as before."""
    step = STEPS - 10
    save = save_dir_at(uninterrupted, tmp_path, step)
    out = tmp_path / "run.h5"
    record = (uninterrupted / "run.h5").read_bytes()
    if left == "damaged":  # as the killed run in CI left it: cut short of its stored end
        out.write_bytes(record[:len(record) - 1500])
        with pytest.raises(OSError):
            h5py.File(out, "r")
    if left.startswith("intact"):
        out.write_bytes(record)
        with h5py.File(save / f"iter_{step:07d}.h5", "r+") as f:
            del f["run_record"]
    result = run(1, 1, out, save, load=save)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert_same(uninterrupted / "run.h5", out, "record")
    kept = tmp_path / "run.h5.damaged"
    if left == "damaged":
        assert f"it is kept as {kept}" in output, output
        assert kept.read_bytes() == record[:len(record) - 1500]
    else:
        assert not kept.exists()
    assert not list(tmp_path.glob("*.restore.tmp")), "a temporary file was left behind"


def test_record_of_another_run_is_refused_and_left_as_it_was(uninterrupted, tmp_path):
    """--out names another run's record (another run_id): restoring the
    checkpoint's record there would destroy it, so nothing is touched."""
    save = save_dir_at(uninterrupted, tmp_path, STEPS - 10)
    out = tmp_path / "run.h5"
    out.write_bytes((uninterrupted / "run.h5").read_bytes())
    with h5py.File(out, "r+") as f:
        f.attrs["run_id"] = "0123456789abcdef"
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    result = run(1, 1, out, save, load=save)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "moesim: error:" in line]
    assert len(errors) == 1, result.stderr
    assert "belongs to another run (0123456789abcdef" in errors[0], errors[0]
    assert "give the --out of that run" in errors[0], errors[0]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "run.h5"]


def test_checkpoint_of_another_model_is_refused_naming_the_tensor(uninterrupted, tmp_path):
    out = tmp_path / "run.h5"
    out.write_bytes((uninterrupted / "run.h5").read_bytes())
    result = run(2, 2, out, tmp_path / "ckpt", load=uninterrupted / "ckpt",
                 **{"hidden-size": 64})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if "moesim: error:" in line]
    assert errors, output
    assert "params/wte" in errors[0] and "[256, 32]" in errors[0] and "[256, 64]" in errors[0], \
        errors[0]


def test_record_of_an_older_schema_is_refused_and_left_as_it_was(uninterrupted, tmp_path):
    """A record written by an older moesim cannot take this one's rows: the
    resume stops before touching it (no "running" status left behind) and
    names both schemas and the fixes."""
    record = tmp_path / "run.h5"
    record.write_bytes((uninterrupted / "run.h5").read_bytes())
    with h5py.File(record, "r+") as f:
        f.attrs["schema_version"] = np.int64(f.attrs["schema_version"] - 1)
        f.attrs["steps_done"] = np.int64(STEPS // 2)   # as if stopped half-way
        status = f.attrs["status"]
    before = hashlib.sha256(record.read_bytes()).hexdigest()
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    half = sorted((uninterrupted / "ckpt").glob("iter_*.h5"))[0]
    (checkpoints / half.name).write_bytes(half.read_bytes())
    (checkpoints / "latest_checkpointed_iteration.txt").write_text(str(int(half.stem[5:])))
    result = run(1, 1, record, tmp_path / "save", load=checkpoints)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "moesim: error:" in line]
    assert len(errors) == 1, result.stderr
    assert "has schema" in errors[0] and "--finetune 1" in errors[0], errors[0]
    assert hashlib.sha256(record.read_bytes()).hexdigest() == before
    with h5py.File(record, "r") as f:
        assert f.attrs["status"] == status


def test_load_without_a_checkpoint_says_what_to_do(tmp_path):
    result = run(1, 1, tmp_path / "run.h5", tmp_path / "ckpt", load=tmp_path / "nothing")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "latest_checkpointed_iteration.txt" in output and "--save" in output, output


def test_loading_a_finished_run_trains_nothing_and_leaves_its_record(uninterrupted, tmp_path):
    record = tmp_path / "run.h5"
    record.write_bytes((uninterrupted / "run.h5").read_bytes())
    before = hashlib.sha256(record.read_bytes()).hexdigest()
    result = run(1, 1, record, tmp_path / "ckpt", load=uninterrupted / "ckpt")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"latest checkpoint is at step {STEPS}, already --train-iters {STEPS}: nothing to " \
        "train" in output and "Raise --train-iters" in output, output
    assert "final train loss" not in output, output
    assert hashlib.sha256(record.read_bytes()).hexdigest() == before
    assert not any((tmp_path / "ckpt").iterdir()), "no checkpoint of a run that trained nothing"


def test_save_keep_keeps_the_newest(tmp_path):
    save = tmp_path / "ckpt"
    result = run(1, 1, tmp_path / "run.h5", save, **{"save-keep": 2})
    assert result.returncode == 0, result.stdout + result.stderr
    kept = sorted(p.name for p in save.glob("iter_*.h5"))
    assert kept == [f"iter_{STEPS - 5:07d}.h5", f"iter_{STEPS:07d}.h5"]
    assert not list(save.glob(".*tmp")), "a temporary file was left behind"


SIGNAL_STEPS = 800  # long enough to be signalled mid-run


def start_run(world, ep, out, save):
    options = {**TINY, "micro-batch-size": GLOBAL_BATCH // world,
               "expert-model-parallel-size": ep, "out": out, "save": save,
               "save-interval": 1000, "train-iters": SIGNAL_STEPS}
    cmd = ["mpirun", "-n", str(world), "--oversubscribe", "--bind-to", "none",
           str(BUILD / "moesim"), "train", *flags(options)]
    return subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_to_one_rank_checkpoints_and_resumes(tmp_path, sig):
    """A signal to one rank: every rank stops at the same step boundary, the
    checkpoint is saved, the record says `interrupted`, the exit status is 75;
    resuming on another layout ends as the uninterrupted run."""
    out, save = tmp_path / "run.h5", tmp_path / "ckpt"
    proc = start_run(2, 2, out, save)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not (out.exists() and len(rank_pids(out)) == 2):
            time.sleep(0.01)
        time.sleep(0.3)
        pids = rank_pids(out)
        assert pids, "the run ended before it could be signalled"
        os.kill(pids[-1], sig)
        output, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if "done:" in output:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 75, output
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "interrupted"
        step = int(f.attrs["steps_done"])
    assert "stopped by" in output and f"after step {step} of {SIGNAL_STEPS}" in output, output
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    long = {"train-iters": SIGNAL_STEPS, "save-interval": 1000}
    result = run(1, 1, out, save, load=save, **long)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = tmp_path / "reference"
    reference.mkdir()
    result = run(1, 1, reference / "run.h5", reference / "ckpt", **long)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same(reference / "run.h5", out, "record")
    assert_same(final_checkpoint(reference / "ckpt"), final_checkpoint(save), "final checkpoint")


def test_info_summarises_a_checkpoint_and_its_directory(uninterrupted):
    path = final_checkpoint(uninterrupted / "ckpt")
    info = moesim_info(path)
    assert info.returncode == 0, info.stdout + info.stderr
    with h5py.File(path, "r") as f:
        tensors = len(f["params"])
        parameters = sum(d.size for d in f["params"].values())
        assert len(f["adam_m"]) == len(f["adam_v"]) == tensors
    lines = info.stdout
    assert lines.startswith(f"moesim checkpoint {path} (")
    assert f"checkpoint schema 1 | iteration {STEPS}, optimizer step {STEPS} of {STEPS}" in lines
    assert "saved on 2 ranks, expert-parallel size 2" in lines, lines
    assert f"model: 2 layers, 2 MoE with 4 experts top-2, expert ffn 32, hidden 32, 2 heads, " \
        f"seq {SEQ} | {tensors} tensors, {parameters} parameters" in lines, lines
    assert "Adam moments present" in lines, lines
    with h5py.File(path, "r") as f:
        copy = f["run_record"].size / 1e6
    assert f"run record: a copy as of this step ({copy:.2f} MB)" in lines, lines
    directory = moesim_info(uninterrupted / "ckpt")
    assert directory.returncode == 0 and directory.stdout == info.stdout, directory.stderr


def test_info_calls_a_dense_checkpoint_dense(tmp_path):
    result = run(1, 1, tmp_path / "dense.h5", tmp_path / "ckpt", **{"dense": 1, "train-iters": 10})
    assert result.returncode == 0, result.stdout + result.stderr
    info = moesim_info(tmp_path / "ckpt")
    assert info.returncode == 0, info.stdout + info.stderr
    assert "model: 2 layers, dense (no MoE layers), FFN 64, hidden 32" in info.stdout, info.stdout
    assert "experts" not in info.stdout.split("model:")[1].splitlines()[0], info.stdout


def test_info_reports_a_truncated_checkpoint_as_corrupt(uninterrupted, tmp_path):
    data = final_checkpoint(uninterrupted / "ckpt").read_bytes()
    path = tmp_path / "iter_0000200.h5"
    path.write_bytes(data[:len(data) * 2 // 3])
    info = moesim_info(path)
    assert info.returncode == 1, info.stdout + info.stderr
    assert info.stdout == "", "info printed before it had read everything"
    assert f"moesim: error: {path} is corrupt" in info.stderr, info.stderr


def test_finetune_takes_the_parameters_only(uninterrupted, tmp_path):
    """--finetune: a new run at step 0 from the checkpoint's parameters. Its
    step-0 evaluation is of exactly the parameters the checkpoint holds, so it
    equals the last evaluation of the run that saved them; Adam starts anew."""
    out, save = tmp_path / "run.h5", tmp_path / "ckpt"
    result = run(2, 2, out, save, load=uninterrupted / "ckpt", finetune=1,
                 **{"train-iters": 10, "save-interval": 0})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "fine-tuning from" in output, output
    with h5py.File(uninterrupted / "run.h5", "r") as f:
        saved_eval = f["eval/loss"][-1]
    with h5py.File(out, "r") as f:
        assert f["eval/step"][0] == 0 and f["eval/loss"][0] == saved_eval
        assert list(f["train/step"][()]) == list(range(1, 11))
        assert "resumes" not in f
    with h5py.File(final_checkpoint(save), "r") as f:
        assert f.attrs["iteration"] == 10 and f.attrs["optimizer_steps"] == 10


def expert_checksums(path):
    """Per global expert index, one checksum over its slice of every expert
    parameter tensor."""
    with h5py.File(path, "r") as f:
        names = sorted(name for name in f["params"] if ".experts." in name)
        assert names, f"{path}: no expert tensors"
        sums = []
        for e in range(TINY["num-experts"]):
            digest = hashlib.sha256()
            for name in names:
                digest.update(name.encode() + f["params"][name][e].tobytes())
            sums.append(digest.hexdigest())
    return sums


@pytest.mark.parametrize("world,ep", [(4, 4), (1, 1)], ids=["EP4", "EP1"])
def test_experts_keep_their_global_index_across_resharding(uninterrupted, tmp_path, world, ep):
    """Saved at EP 2, loaded at EP 4 and at 1, saved again unchanged (a
    learning rate of 1e-30 moves no weight of size 1e-20 or more, as float32
    rounds such a step away; the flag refuses 0): every expert's parameters are back at the same global
    index, none lost or doubled. In between, the step-0 evaluation of the
    loaded model equals the saving run's last one, so each rank computed with
    the experts it was meant to own."""
    saved = final_checkpoint(uninterrupted / "ckpt")
    before = expert_checksums(saved)
    assert len(set(before)) == len(before), "two experts were equal to begin with"
    out, save = tmp_path / "run.h5", tmp_path / "ckpt"
    result = run(world, ep, out, save, load=uninterrupted / "ckpt", finetune=1, lr=1e-30,
                 **{"min-lr": 1e-30, "train-iters": 1, "lr-warmup-iters": 0,
                    "save-interval": 0})
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(uninterrupted / "run.h5", "r") as f, h5py.File(out, "r") as g:
        assert g["eval/loss"][0] == f["eval/loss"][-1]
    assert expert_checksums(final_checkpoint(save)) == before


def test_no_load_optim_keeps_the_step_but_not_the_moments(uninterrupted, tmp_path):
    """--no-load-optim: the run continues from the checkpoint's step with the
    Adam moments at zero, so it leaves the uninterrupted trajectory."""
    save = tmp_path / "ckpt"
    save.mkdir()
    step = STEPS - 10
    name = f"iter_{step:07d}.h5"
    (save / name).write_bytes((uninterrupted / "ckpt" / name).read_bytes())
    (save / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")
    out = tmp_path / "run.h5"
    out.write_bytes((uninterrupted / "run.h5").read_bytes())
    result = run(2, 2, out, save, load=save, **{"no-load-optim": 1})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Adam moments from zero" in output, output
    with h5py.File(out, "r") as f, h5py.File(uninterrupted / "run.h5", "r") as g:
        assert np.array_equal(f["train/loss"][:step], g["train/loss"][:step])
        assert not np.array_equal(f["train/loss"][step:], g["train/loss"][step:])
