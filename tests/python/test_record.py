"""The run record on disk: crash safety under SIGKILL, and `moesim info`."""
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from moesim_run import (BUILD, RECORD_UNITS, clean_env, flags, moesim_info, run_moesim,
                        write_synthetic_record)

SMALL = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
    "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64, "eval-iters": 1,
    "data-format": "synthetic", "synthetic-tokens": 20000, "micro-batch-size": 2,
}
FLUSH = 5


def step_series(f):
    """Every per-step dataset (first dimension = logged steps)."""
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and (
        name.startswith(("train/", "routing/", "timing/", "traffic/"))) else None)
    return names


def test_sigkill_mid_training_leaves_a_readable_record_up_to_the_last_flush(tmp_path):
    out = tmp_path / "killed.h5"
    options = {**SMALL, "train-iters": 100000, "eval-interval": 7, "progress-interval": 1,
               "record-flush-interval": FLUSH, "out": out}
    cmd = ["mpirun", "-n", "2", "--oversubscribe", str(BUILD / "moesim"), "train",
           *flags(options)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 23:
                break
            assert time.monotonic() < deadline, "the run never reached step 23"
    finally:
        # SIGKILL the training ranks themselves (found by their unique --out),
        # then mpirun; wait until no rank holds the file any more.
        subprocess.run(["pkill", "-KILL", "-f", str(out)], check=False)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "killed ranks did not go away"
            time.sleep(0.1)
    assert proc.returncode != 0

    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "running"
        steps_done = int(f.attrs["steps_done"])
        assert steps_done >= 20 and steps_done % FLUSH == 0, steps_done
        # steps_done is written after the rows it counts: a kill between the two
        # leaves one flush of rows beyond it, never fewer rows than it claims.
        # A flush extends the series one after another, so a kill inside one
        # (a few ms of every FLUSH steps) leaves some a flush ahead of others.
        for name in step_series(f):
            assert f[name].shape[0] in (steps_done, steps_done + FLUSH), (name, f[name].shape)
        assert list(f["train/step"][:steps_done]) == list(range(1, steps_done + 1))
        assert np.isfinite(f["train/loss"][:steps_done]).all()
        evals = [int(s) for s in f["eval/step"][:] if s <= steps_done]
        assert evals == list(range(0, steps_done + 1, 7)), evals
        assert f["specialization/counts"].shape[0] >= len(evals)


@pytest.fixture(scope="module")
def complete_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "run.h5"
    result = run_moesim("train", {**SMALL, "train-iters": 12, "eval-interval": 6, "out": out})
    assert result.returncode == 0, result.stderr
    return out


def test_info_summarises_a_run(complete_record):
    result = moesim_info(complete_record)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    with h5py.File(complete_record, "r") as f:
        final_train = f["train/loss"][-1]
        final_val = f["eval/loss"][-1]
    for part in ("status complete", "2 layers (2 MoE), hidden 32, 4 experts top-2",
                 "steps: 12 of 12", f"final train {final_train:.4f}",
                 f"final validation {final_val:.4f} (step 12)", "tokens/s", "% of assignments",
                 "load CV per MoE layer", "attention", "dispatch", "grad_allreduce",
                 "communication per step"):
        assert part in text, f"{part!r} missing from:\n{text}"


def test_record_holds_exactly_the_documented_datasets_with_their_units(complete_record):
    """Schema 10, as docs/run-record.md lists it (RECORD_UNITS mirrors it)."""
    found = {}
    with h5py.File(complete_record, "r") as f:
        assert f.attrs["schema_version"] == 10
        assert f.attrs["num_nodes"] == 1
        assert list(f.attrs["node_of_rank"]) == [0]
        f.visititems(lambda name, obj: found.__setitem__(name, obj.attrs["units"])
                     if isinstance(obj, h5py.Dataset) else None)
        assert f["traffic/internode_bytes"].shape == (12, 1, 1)
        assert f["timing/comm/exposed/dispatch"].shape == (12, 1)
    assert {name: found[name] for name in RECORD_UNITS} == RECORD_UNITS
    assert set(found) == set(RECORD_UNITS)


def test_info_summarises_a_schema_3_record(tmp_path):
    """Schema 4 only added routing datasets that info does not read."""
    path = tmp_path / "schema3.h5"
    write_synthetic_record(path, schema=3)
    result = moesim_info(path)
    assert result.returncode == 0, result.stderr
    assert "schema 3 | status complete" in result.stdout, result.stdout


def write_foreign_hdf5(path, **attrs):
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)
        for key, value in attrs.items():
            f.attrs[key] = value


@pytest.mark.parametrize("kind", ["missing", "not-hdf5", "foreign-hdf5", "newer-schema",
                                  "older-schema"])
def test_info_rejects_what_is_not_a_readable_record(tmp_path, kind):
    path = tmp_path / "input.h5"
    expected = {
        "missing": "no such file",
        "not-hdf5": "is not an HDF5 file",
        "foreign-hdf5": "not a moesim run record",
        "newer-schema": "use a newer moesim",
        "older-schema": "re-run it with this moesim",
    }[kind]
    if kind == "not-hdf5":
        path.write_text("step,loss\n1,2.0\n")
    elif kind == "foreign-hdf5":
        write_foreign_hdf5(path)
    elif kind == "newer-schema":
        write_foreign_hdf5(path, moesim_version="9.0", schema_version=99)
    elif kind == "older-schema":
        write_foreign_hdf5(path, moesim_version="0.0.1", schema_version=1)
    result = moesim_info(path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("moesim: error:")]
    assert len(errors) == 1, result.stderr
    assert str(path) in errors[0] and expected in errors[0], errors[0]


def test_a_dense_model_records_empty_routing(tmp_path):
    """No MoE layer: routing and specialisation rows exist per step and eval but
    hold zero layers (they once held memory read past their buffers)."""
    out = tmp_path / "dense.h5"
    result = run_moesim("train", {**SMALL, "moe-layer-freq": 1000, "train-iters": 6,
                                  "eval-interval": 3, "out": out})
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f["routing/tokens_per_expert"].shape == (6, 0, 4)
        assert f["routing/load_cv"].shape == (6, 0)
        assert f["specialization/counts"].shape[:2] == (3, 0)
        assert f["specialization/mutual_information"].shape == (3, 0)
        assert f["traffic/dispatch_bytes"][()].sum() == 0
    assert moesim_info(out).returncode == 0
