"""A run record that never lies (issue 13): a diverging run stops and says so,
skipped non-finite steps, an existing or busy record at --out left alone,
`moesim info` refusing what it cannot read back; and the small defaults that
used to get in the way (bare switches, the bias rate, soft routing alone, a
missing output directory). Every subprocess runs with a timeout."""
import fcntl
import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from moesim_run import (BUILD, clean_env, flags, moesim_info, rank_pids, read_everything,
                        run_moesim, run_mpi)

SMALL = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
    "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64, "eval-iters": 1,
    "data-format": "synthetic", "synthetic-tokens": 20000, "micro-batch-size": 2,
    "progress-interval": 1000,
}
# The diverging run: a weight decay of lr x 10 = 100 per step flips and
# grows every weight by ~99x until the gradients overflow (step 7 here).
DIVERGING = {"lr": 10, "clip-grad": 0, "lr-warmup-iters": 0, "min-lr": 10, "weight-decay": 10,
             "train-iters": 200}
RUN_TIMEOUT = 120
DIVERGED_AT = re.compile(r"training diverged at step (\d+)")
TENSOR = re.compile(r"the first tensor with a non-finite gradient is (\S+) \((\d+) of (\d+) "
                    r"tensors\)")


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("moesim: error:")]


def train_finite_rows(f):
    return np.isfinite(f["train/loss"][:]) & np.isfinite(f["train/grad_norm"][:])


# ---- divergence -------------------------------------------------------------------------

def test_diverging_run_stops_on_every_rank_with_one_message(tmp_path):
    """2 ranks, each wrapped in a shell that reports its own exit status, so a
    rank that hung or exited 0 would show."""
    out = tmp_path / "diverged.h5"
    moesim = " ".join([str(BUILD / "moesim"), "train",
                       *flags({**SMALL, **DIVERGING, "micro-batch-size": 1, "out": out})])
    wrapped = f'{moesim}; echo "rank $OMPI_COMM_WORLD_RANK exit $?"'
    proc = subprocess.Popen(["mpirun", "-n", "2", "--oversubscribe", "sh", "-c", wrapped],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:  # timed out: no rank may be left spinning
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    output = result.stdout + result.stderr
    statuses = dict(re.findall(r"^rank (\d) exit (\d+)$", result.stdout, re.M))
    assert statuses == {"0": "1", "1": "1"}, output
    errors = error_lines(output)
    assert len(errors) == 1, output
    step = int(DIVERGED_AT.search(errors[0]).group(1))
    tensor = TENSOR.search(errors[0])
    assert tensor, errors[0]
    # 2 layers, both MoE: wte, wpe, 5 per layer, lnf and 2 expert tensors per layer
    assert re.fullmatch(r"wte|wpe|lnf_w|layers\.[01]\.[a-z0-9_.]+", tensor.group(1)), errors[0]
    assert tensor.group(3) == "17", errors[0]
    assert str(out) in errors[0] and "marked diverged" in errors[0], errors[0]

    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "diverged"
        assert f.attrs["steps_done"] == step
        assert list(f["train/step"][:]) == list(range(1, step + 1))
        finite = train_finite_rows(f)
        assert finite[:-1].all() and not finite[-1], (f["train/loss"][:], f["train/grad_norm"][:])
        assert max(f["eval/step"][:]) < step
        for name in ("routing/tokens_per_expert", "timing/optimizer", "traffic/dispatch_bytes"):
            assert f[name].shape[0] == step, name


def test_skipped_nonfinite_steps_are_recorded_then_the_run_stops(tmp_path):
    plain = run_moesim("train", {**SMALL, **DIVERGING, "out": tmp_path / "plain.h5"},
                       timeout=RUN_TIMEOUT)
    first_bad = int(DIVERGED_AT.search(plain.stderr).group(1))

    out = tmp_path / "skipped.h5"
    result = run_moesim("train", {**SMALL, **DIVERGING, "skip-nonfinite-steps": 3, "out": out},
                        timeout=RUN_TIMEOUT)
    assert result.returncode == 1, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "moesim: warning: step" in line]
    assert [int(re.search(r"step (\d+):", w).group(1)) for w in warnings] == \
        [first_bad, first_bad + 1, first_bad + 2], result.stderr
    assert all("Skipped without an update" in w for w in warnings), warnings
    assert "3 of 3 allowed by --skip-nonfinite-steps" in warnings[-1]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert f"diverged at step {first_bad + 3} after 3 skipped step(s)" in errors[0], errors[0]
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "diverged"
        assert f.attrs["steps_done"] == first_bad + 3
        finite = train_finite_rows(f)
        assert finite[:first_bad - 1].all() and not finite[first_bad - 1:].any()


def test_a_skipped_last_step_still_completes(tmp_path):
    """Skipping is the user's choice: a run whose only bad step is skipped ends
    'complete', that step recorded with its non-finite values."""
    plain = run_moesim("train", {**SMALL, **DIVERGING, "out": tmp_path / "plain.h5"},
                       timeout=RUN_TIMEOUT)
    first_bad = int(DIVERGED_AT.search(plain.stderr).group(1))
    out = tmp_path / "complete.h5"
    result = run_moesim("train", {**SMALL, **DIVERGING, "train-iters": first_bad,
                                  "skip-nonfinite-steps": 1, "out": out}, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"
        assert not train_finite_rows(f)[-1]


# ---- one record, one run ------------------------------------------------------------------

def test_existing_record_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run.h5"
    assert run_moesim("train", {**SMALL, "train-iters": 3, "out": out},
                      timeout=RUN_TIMEOUT).returncode == 0
    before = out.read_bytes()
    refused = run_moesim("train", {**SMALL, "train-iters": 5, "out": out}, timeout=RUN_TIMEOUT)
    assert refused.returncode == 2, refused.stderr
    errors = error_lines(refused.stderr)
    assert len(errors) == 1 and str(out) in errors[0] and "--overwrite 1" in errors[0], errors
    assert out.read_bytes() == before
    replaced = run_moesim("train", {**SMALL, "train-iters": 5, "overwrite": 1, "out": out},
                          timeout=RUN_TIMEOUT)
    assert replaced.returncode == 0, replaced.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["steps_done"] == 5


def test_a_second_run_on_the_same_out_is_refused_and_the_first_goes_on(tmp_path):
    """The first run is far from done when the second is refused; a signal
    then stops it at a step boundary, and its record reads back whole."""
    out = tmp_path / "shared.h5"
    steps = 1_000_000
    first_cmd = ["mpirun", "-n", "2", "--oversubscribe", str(BUILD / "moesim"), "train",
                 *flags({**SMALL, "train-iters": steps, "progress-interval": 100,
                         "eval-interval": 500, "out": out})]
    first = subprocess.Popen(first_cmd, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        lines = []
        for line in first.stdout:  # wait until it is training, its record open
            lines.append(line)
            if line.startswith("step"):
                break
            assert time.monotonic() < deadline, "the first run never started training"
        assert out.exists(), "".join(lines)

        start = time.monotonic()
        second = run_mpi(2, "train", {**SMALL, "train-iters": 5, "overwrite": 1, "out": out},
                         timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - start
        output = second.stdout + second.stderr
        assert second.returncode != 0, output
        errors = error_lines(output)
        assert len(errors) == 1, output
        assert "another run (pid" in errors[0] and f"holds --out {out}" in errors[0], errors[0]
        assert elapsed < 30, f"the second run took {elapsed:.0f}s to be refused"
        assert first.poll() is None, "the first run ended before the second was refused"

        os.kill(rank_pids(out)[0], signal.SIGUSR1)
        rest, _ = first.communicate(timeout=RUN_TIMEOUT)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == 75, "".join(lines) + rest
    values = read_everything(out)
    done = int(values["/@steps_done"])
    assert values["/@status"] == "interrupted" and 0 < done < steps
    assert list(values["train/step"]) == list(range(1, done + 1))
    assert not (tmp_path / "shared.h5.lock").exists()


def test_missing_output_directories_are_created_by_rank_0(tmp_path):
    out = tmp_path / "new" / "deeper" / "run.h5"
    result = run_mpi(2, "train", {**SMALL, "train-iters": 2, "out": out}, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"


# ---- moesim info --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "good.h5"
    result = run_moesim("train", {**SMALL, "train-iters": 20, "eval-interval": 10, "out": out},
                        timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return out


def damage_object_header(path, dataset):
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[dataset].id).addr
    with open(path, "r+b") as f:
        f.seek(address)
        f.write(b"\0" * 16)


@pytest.mark.parametrize("damage", ["truncated", "dataset-header"])
def test_info_reports_an_unreadable_record_as_corrupt(tmp_path, good_record, damage):
    path = tmp_path / "damaged.h5"
    data = good_record.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(data)
        damage_object_header(path, "routing/load_cv")
    result = moesim_info(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == "", "info printed before it had read everything"
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"{path} is corrupt" in errors[0], result.stderr
    if damage == "dataset-header":
        assert "/routing/load_cv cannot be read" in errors[0], errors[0]


def test_info_reads_a_good_record(good_record):
    result = moesim_info(good_record)
    assert result.returncode == 0, result.stderr
    assert "status complete" in result.stdout


# ---- is a running record live? ------------------------------------------------------------

def start_endless_run(out):
    """A 2-rank run that would take hours, once it has flushed its record.
    The flush at step 100 comes just before the progress line of step 100,
    and the next one 100 steps later, so what the caller does on that line
    (read the live record, SIGKILL the ranks) lands between flushes: HDF5
    1.10 writes a flush's metadata in no crash-safe order, and a SIGKILL
    inside one (a flush every 10 steps made that happen in CI) can leave a
    dataset unreadable (README, "Output: the run record"). mpirun leads a session of its
    own, so the caller can kill everything it started."""
    cmd = ["mpirun", "-n", "2", "--oversubscribe", str(BUILD / "moesim"), "train",
           *flags({**SMALL, "train-iters": 1_000_000, "progress-interval": 100,
                   "record-flush-interval": 100, "eval-interval": 500, "out": out})]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step"):
            return proc, lines
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    pytest.fail("the run never started training:\n" + "".join(lines))


def test_info_says_a_live_record_is_live(tmp_path):
    out = tmp_path / "live.h5"
    proc, lines = start_endless_run(out)
    try:
        info = moesim_info(out)
        os.kill(rank_pids(out)[0], signal.SIGUSR1)
        rest, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "status running" in info.stdout, info.stdout
    assert f"live: a process holds {out}.lock and wrote the record" in info.stdout, info.stdout
    assert proc.returncode == 75, "".join(lines) + rest
    after = moesim_info(out)
    assert after.returncode == 0 and "status interrupted" in after.stdout, after.stdout
    assert "live:" not in after.stdout and "stopped without finishing" not in after.stdout


def test_info_says_a_killed_run_stopped_without_finishing(tmp_path):
    out = tmp_path / "killed.h5"
    proc, _ = start_endless_run(out)
    ranks = rank_pids(out)
    try:
        assert len(ranks) == 2, ranks
        for pid in ranks:  # SIGKILL to mpirun alone would leave its ranks running
            os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while rank_pids(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rank_pids(out), "the ranks outlived SIGKILL"
    info = moesim_info(out)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "status running" in info.stdout, info.stdout
    assert re.search(rf"stopped without finishing: no process holds {re.escape(str(out))}\.lock "
                     r"and the last write was \d+s ago", info.stdout), info.stdout
    with h5py.File(out, "r") as f:
        assert f.attrs["last_write_time"] <= time.time()
        assert f.attrs["flush_period_s"] > 0


def test_info_says_a_locked_record_without_a_heartbeat_stopped(tmp_path, good_record):
    """A process that holds the lock but has written nothing for an hour (of
    1 s flush periods) is no longer running its steps."""
    path = tmp_path / "stuck.h5"
    path.write_bytes(good_record.read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["status"] = "running"
        f.attrs["last_write_time"] = time.time() - 3600
        f.attrs["flush_period_s"] = 1.0
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = moesim_info(path)
    released = moesim_info(path)
    assert held.returncode == 0, held.stderr
    assert "stopped without finishing? a process still holds" in held.stdout, held.stdout
    assert "the last write was 1h 00m ago, over 1m 00s" in held.stdout, held.stdout
    assert released.returncode == 0, released.stderr
    assert "stopped without finishing: no process holds" in released.stdout, released.stdout


def test_info_waits_out_a_live_writers_flush(tmp_path, good_record):
    """A record read while its live writer is mid-flush looks truncated for a
    moment; info retries while the lock is held instead of calling it corrupt.
    Without the lock, or when the damage stays, it is corrupt."""
    path = tmp_path / "flushing.h5"
    data = good_record.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stays = moesim_info(path)
        proc = subprocess.Popen([str(BUILD / "moesim"), "info", str(path)], env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        path.write_bytes(data)
        healed_out, healed_err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, healed_out + healed_err
    assert "status complete" in healed_out, healed_out
    assert stays.returncode == 1 and f"{path} is corrupt" in stays.stderr, stays.stderr
    path.write_bytes(data[:len(data) // 2])
    unlocked = moesim_info(path)
    assert unlocked.returncode == 1 and f"{path} is corrupt" in unlocked.stderr, unlocked.stderr


# ---- defaults that used to get in the way -------------------------------------------------

def test_bare_expert_bias_switch_uses_megatrons_rate(tmp_path):
    out = tmp_path / "bias.h5"
    cmd = [str(BUILD / "moesim"), "train", *flags({**SMALL, "train-iters": 6, "out": out}),
           "--moe-router-enable-expert-bias"]
    result = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["config.moe_router_enable_expert_bias"] == 1
        assert f.attrs["config.moe_router_bias_update_rate"] == 1e-3
        steps = np.diff(f["routing/expert_bias"][:], axis=0)
    np.testing.assert_allclose(np.abs(steps[steps != 0]), 1e-3, rtol=1e-4)
    assert (steps != 0).any()


def test_soft_routing_alone_is_dropless(tmp_path):
    out = tmp_path / "soft.h5"
    result = run_moesim("train", {**SMALL, "train-iters": 3, "moe-router-type": "soft",
                                  "out": out}, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["config.moe_expert_capacity_factor"] == 0
        assert f.attrs["config.moe_router_topk"] == 4
        assert f["routing/dropped_per_expert"][()].sum() == 0
