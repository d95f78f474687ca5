"""A full disk (issue 13, "the record never lies"): a run whose record or
checkpoint no longer fits stops on every rank with one message naming the
file and the fix; the record stays readable up to its last good flush, says
`failed` and why, and its steps_done counts exactly the rows on disk; a
checkpoint that does not fit leaves nothing behind and the previous one the
latest. Real small tmpfs mounts (root only); every run has a timeout."""
import os
import re
import signal
import subprocess

import pytest

from moesim_run import BUILD, clean_env, flags, moesim_info, read_everything, tmpfs

SMALL = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
    "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64, "eval-iters": 1,
    "data-format": "synthetic", "synthetic-tokens": 20000, "micro-batch-size": 1,
    "progress-interval": 100000, "eval-interval": 100000, "log-interval": 1,
}
TIMEOUT = 120
FIX = "free space on that disk or choose another --out"


def run_two_ranks(options):
    """`mpirun -n 2 moesim train`, each rank wrapped in a shell that reports
    its own exit status (a rank that hung or exited 0 would show); the
    session is killed if it outlives TIMEOUT."""
    moesim = " ".join([str(BUILD / "moesim"), "train", *flags(options)])
    wrapped = f'{moesim}; echo "rank $OMPI_COMM_WORLD_RANK exit $?"'
    proc = subprocess.Popen(["mpirun", "-n", "2", "--oversubscribe", "sh", "-c", wrapped],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    statuses = dict(re.findall(r"^rank (\d) exit (\d+)$", stdout, re.M))
    errors = [line for line in (stdout + stderr).splitlines() if "moesim: error:" in line]
    return statuses, errors, stdout + stderr


def assert_failed_record_reads_back(out, error):
    """The record of a run stopped by `error`: whole, failed, saying why, and
    steps_done = the rows on disk (one per step at --log-interval 1)."""
    values = read_everything(out)
    done = int(values["/@steps_done"])
    assert values["/@status"] == "failed"
    assert values["/@failure"] == error.split("moesim: error: ", 1)[1]
    assert list(values["train/step"]) == list(range(1, done + 1))
    for name in ("train/loss", "routing/tokens_per_expert", "timing/optimizer",
                 "traffic/dispatch_bytes"):
        assert values[name].shape[0] == done, name
    info = moesim_info(out)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "status failed" in info.stdout and f"steps: {done} of" in info.stdout, info.stdout
    assert "failure: " in info.stdout, info.stdout
    assert not out.with_name(out.name + ".reserve").exists()
    assert not out.with_name(out.name + ".lock").exists()
    return done


# The first flush of this model's record allocates one chunk per dataset, up
# to 2.2 MB by record_flush's bound (schema 8): 800k holds the new record and
# its 256 kB reserve but not that; 3000k holds it, and the run fills the disk
# when its rows reach the second chunks (row 1025).
@pytest.mark.parametrize("size, first_flush", [("800k", True), ("3000k", False)])
def test_a_full_disk_leaves_a_whole_failed_record(tmp_path, size, first_flush):
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "run.h5"
        statuses, errors, output = run_two_ranks({**SMALL, "train-iters": 5000, "out": out})
        assert statuses == {"0": "1", "1": "1"}, output
        assert len(errors) == 1, output
        assert f"the disk of the run record {out} is full" in errors[0], errors[0]
        assert FIX in errors[0], errors[0]
        done = assert_failed_record_reads_back(out, errors[0])
        if first_flush:
            assert done == 0 and "holding no step" in errors[0], errors[0]
        else:
            assert done > 1000 and done % 10 == 0, done
            assert f"holding the steps up to {done}" in errors[0], errors[0]


def test_a_full_disk_refuses_a_new_record_at_once(tmp_path):
    """No room for the reserve: refused before the first step, the file
    untouched (it never existed)."""
    with tmpfs(tmp_path / "disk", "128k") as disk:
        out = disk / "run.h5"
        statuses, errors, output = run_two_ranks({**SMALL, "train-iters": 50, "out": out})
        assert statuses == {"0": "1", "1": "1"}, output
        assert len(errors) == 1 and str(out) in errors[0] and FIX in errors[0], output
        assert not out.exists() and not out.with_name("run.h5.reserve").exists()


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_latest(tmp_path):
    """--save on a disk with room for one checkpoint (1.75 MB, of which the
    record's copy is 1.3 MB; the bound says up to 1.95 MB): the second save is
    refused, no file of it is left, the first stays the latest and loads, and
    the record (elsewhere) says why."""
    with tmpfs(tmp_path / "disk", "3000k") as disk:
        save = disk / "ckpt"
        out = tmp_path / "run.h5"
        statuses, errors, output = run_two_ranks(
            {**SMALL, "train-iters": 100, "save-interval": 5, "save": save, "out": out})
        assert statuses == {"0": "1", "1": "1"}, output
        assert len(errors) == 1, output
        assert f"the disk of --save {save} is full" in errors[0], errors[0]
        assert "checkpoint 5 stays the latest" in errors[0], errors[0]
        assert sorted(p.name for p in save.iterdir()) == \
            ["iter_0000005.h5", "latest_checkpointed_iteration.txt"]
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
        info = moesim_info(save)
        assert info.returncode == 0 and "iteration 5," in info.stdout, info.stdout + info.stderr
        assert assert_failed_record_reads_back(out, errors[0]) == 10
