"""experiments/sweep, the sweep runner, through the real build/moesim:

1. A two-point sweep on 2 ranks: complete records, index.csv with the grid
   values, the merged per-point .ini (base-config < [base] < grid) and .log,
   progress lines, and load_runs reading the directory.
2. Resuming: complete points are skipped untouched; partial records (status
   running, a truncated file) run again.
3. A failing point is reported with moesim's message, the sweep goes on, the
   exit status is 1, index.csv marks it; the fixed spec reruns only that point.
4. A timeout and Ctrl-C stop the point with no process left behind.
5. The spec: point names, zip mode, [point NAME] sections, --dry-run, the
   launcher command lines, and malformed specs exiting 2 before running.
"""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from moesim_run import BUILD

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweep"
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "analysis"))

from sweep_lib.spec import SpecError, grid_point_names  # noqa: E402

TINY = """\
num-layers = 2
hidden-size = 32
num-attention-heads = 2
seq-length = 16
num-experts = 4
moe-ffn-hidden-size = 32
ffn-hidden-size = 64
train-iters = 6
eval-interval = 3
eval-iters = 1
data-format = synthetic
synthetic-tokens = 20000
micro-batch-size = 2
"""
LONG = "train-iters = 100000\nrecord-flush-interval = 1\n"


def sweep(spec, out, *args, env=None, timeout=120):
    """Runs the runner as a user would, outside any SLURM job unless env says."""
    env = env or {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([str(SWEEP), str(spec), "--out", str(out), "--moesim",
                           str(BUILD / "moesim"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def write(path, text):
    path.write_text(text)
    return path


def index(out):
    with open(out / "index.csv", newline="") as f:
        return {row["point"]: row for row in csv.DictReader(f)}


def status(record):
    with h5py.File(record, "r", locking=False) as f:
        return f.attrs["status"]


def snapshot(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def assert_no_process_left(record):
    """No process has the record's path on its command line; any that does is
    killed (by pid) before the test fails, so a failure leaves nothing running."""
    found = subprocess.run(["pgrep", "-f", str(record)], capture_output=True, text=True)
    left = [int(pid) for pid in found.stdout.split()]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], f"processes of {record} still running"


@pytest.fixture(scope="module")
def two_point(tmp_path_factory):
    """A finished two-point sweep on 2 ranks: (spec, out, result)."""
    directory = tmp_path_factory.mktemp("two_point")
    write(directory / "base.ini", f"[model]\n{TINY}num-layers = 3\ntrain_iters = 50\n"
          "out = elsewhere.h5\n")
    spec = write(directory / "spec.ini", """\
[sweep]
world-size = 2          ; ranks per point
base-config = base.ini
[base]
num-layers = 2
train-iters = 6
[grid]
moe-expert-capacity-factor = 0.5, 0
""")
    out = directory / "out"
    return spec, out, sweep(spec, out)


def test_two_point_sweep_runs_both_points_on_2_ranks(two_point):
    spec, out, result = two_point
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\[1/2\] ecf0\.5 done in \d+\.\ds \| 0 failed \| ETA \d+s$",
                     result.stdout, re.M), result.stdout
    assert re.search(r"^\[2/2\] ecf0 done in \d+\.\ds \| 0 failed \| ETA 0s$",
                     result.stdout, re.M), result.stdout
    rows = index(out)
    assert list(rows) == ["ecf0.5", "ecf0"]
    for name, capacity in (("ecf0.5", "0.5"), ("ecf0", "0")):
        row = rows[name]
        assert (row["status"], row["record"], row["returncode"], row["world_size"]) == (
            "done", f"{name}.h5", "0", "2")
        assert row["moe_expert_capacity_factor"] == capacity
        assert float(row["elapsed_s"]) > 0
        with h5py.File(out / f"{name}.h5", "r", locking=False) as f:
            assert f.attrs["status"] == "complete"
            assert f.attrs["world_size"] == 2
            assert f.attrs["config.moe_expert_capacity_factor"] == float(capacity)
            assert f.attrs["config.num_layers"] == 2
            assert f.attrs["steps_done"] == 6
        ini = (out / f"{name}.ini").read_text()
        keys = dict(line.split(" = ", 1) for line in ini.splitlines()
                    if " = " in line and not line.startswith(";"))
        # base.ini's keys, [base] over them (either spelling), the grid value last.
        assert keys["num-layers"] == "2" and keys["train-iters"] == "6"
        assert keys["moe-expert-capacity-factor"] == capacity
        assert keys["hidden-size"] == "32"
        assert "out" not in keys and "train_iters" not in keys
        log = (out / f"{name}.log").read_text()
        assert log.startswith(f"$ mpirun -n 2 {BUILD / 'moesim'} train --config "
                              f"{out / name}.ini --out {out / name}.h5 --overwrite 1\n")
        assert "done: 6 steps" in log

    from moesim_analysis import load_runs
    runs = load_runs(str(out / "*.h5"))
    config = runs.config.set_index("run")
    assert sorted(config.index) == ["ecf0", "ecf0.5"]
    for name, row in rows.items():
        assert config.loc[name, "moe_expert_capacity_factor"] == float(
            row["moe_expert_capacity_factor"])


def test_rerun_skips_complete_points_without_touching_them(two_point):
    spec, out, _ = two_point
    before = snapshot(out)
    start_times = {name: h5py.File(out / f"{name}.h5", "r", locking=False).attrs["start_time"]
                   for name in ("ecf0.5", "ecf0")}
    result = sweep(spec, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/2] ecf0.5 skipped" in result.stdout and "[2/2] ecf0 skipped" in result.stdout
    assert "0 done, 2 skipped, 0 failed" in result.stdout
    after = snapshot(out)
    for name in ("ecf0.5", "ecf0"):
        for suffix in (".h5", ".ini", ".log"):
            assert after[name + suffix] == before[name + suffix], name + suffix
        with h5py.File(out / f"{name}.h5", "r", locking=False) as f:
            assert f.attrs["start_time"] == start_times[name]
    rows = index(out)
    assert [(r["status"], r["returncode"]) for r in rows.values()] == [("skipped", "0")] * 2


def test_partial_records_run_again(two_point, tmp_path):
    spec, out, _ = two_point
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    with h5py.File(partial / "ecf0.5.h5", "r+") as f:
        f.attrs["status"] = "running"
    truncated = partial / "ecf0.h5"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])

    dry = sweep(spec, partial, "--dry-run")
    assert "[1/2] ecf0.5 would run" in dry.stdout and "[2/2] ecf0 would run" in dry.stdout
    result = sweep(spec, partial)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/2] ecf0.5 done" in result.stdout and "[2/2] ecf0 done" in result.stdout
    assert status(partial / "ecf0.5.h5") == "complete"
    assert status(partial / "ecf0.h5") == "complete"
    assert [r["status"] for r in index(partial).values()] == ["done", "done"]


def test_failing_point_is_reported_and_the_sweep_goes_on(tmp_path):
    spec_text = """\
[sweep]
world-size = 1
[base]
{tiny}
[point broken]
data-format = {data_format}
data-path = {data_path}
[grid]
moe-router-topk = 1, 2
"""
    spec = write(tmp_path / "spec.ini", spec_text.format(
        tiny=TINY, data_format="text", data_path="/nonexistent/corpus.txt"))
    out = tmp_path / "out"
    result = sweep(spec, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[1/3] broken failed (exit 2)" in result.stdout, result.stdout
    assert "moesim: error: --data-path /nonexistent/corpus.txt" in result.stdout
    assert "[2/3] rt1 done" in result.stdout and "[3/3] rt2 done" in result.stdout
    assert "failed: broken" in result.stdout
    rows = index(out)
    assert (rows["broken"]["status"], rows["broken"]["returncode"]) == ("failed", "2")
    assert rows["broken"]["moe_router_topk"] == ""  # a [point] row: the value it runs with
    assert [rows[n]["status"] for n in ("rt1", "rt2")] == ["done", "done"]
    assert (out / "broken.log").exists() and not (out / "broken.h5").exists()
    good = {n: (out / f"{n}.h5").stat().st_mtime_ns for n in ("rt1", "rt2")}

    write(spec, spec_text.format(tiny=TINY, data_format="synthetic", data_path="synthetic"))
    result = sweep(spec, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/3] broken done" in result.stdout
    assert "[2/3] rt1 skipped" in result.stdout and "[3/3] rt2 skipped" in result.stdout
    assert {n: (out / f"{n}.h5").stat().st_mtime_ns for n in good} == good
    assert status(out / "broken.h5") == "complete"
    assert [r["status"] for r in index(out).values()] == ["done", "skipped", "skipped"]


def test_timeout_stops_the_point_and_every_rank(tmp_path):
    spec = write(tmp_path / "spec.ini", f"""\
[sweep]
world-size = 2
timeout = 3
[base]
{TINY}
[point long]
{LONG}
[point after]
""")
    out = tmp_path / "out"
    started = time.monotonic()
    result = sweep(spec, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 20
    assert "[1/2] long failed (timed out after 3s, stopped)" in result.stdout, result.stdout
    assert "[2/2] after done" in result.stdout
    assert_no_process_left(out / "long.h5")
    assert index(out)["long"]["status"] == "failed"
    assert status(out / "long.h5") != "complete"
    assert (out / "long.log").read_text().rstrip().endswith("stopped after the timeout of 3 s")


def test_ctrl_c_stops_the_point_and_the_sweep(tmp_path):
    spec = write(tmp_path / "spec.ini", f"""\
[sweep]
world-size = 2
[base]
{TINY}
[point long]
{LONG}
[point next]
""")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    runner = subprocess.Popen([str(SWEEP), str(spec), "--out", str(out), "--moesim",
                               str(BUILD / "moesim")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        log = out / "long.log"
        while not (log.exists() and "step" in log.read_text()):
            assert runner.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.1)
        runner.send_signal(signal.SIGINT)
        stdout, stderr = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 130, stdout + stderr
    assert "interrupted; stopped long" in stderr
    assert_no_process_left(out / "long.h5")
    assert status(out / "long.h5") != "complete"
    rows = index(out)
    assert (rows["long"]["status"], rows["next"]["status"]) == ("failed", "pending")
    assert not (out / "next.h5").exists()


def test_dry_run_lists_points_and_commands_and_writes_nothing(tmp_path):
    many = (os.cpu_count() or 1) + 1
    spec = write(tmp_path / "spec.ini", f"""\
[sweep]
mode = zip
[base]
{TINY}
[grid]
world-size = 1, {many}
moe-router-type = topk, switch
[point dense]
world-size = 1
moe-layer-freq = 1000
""")
    out = tmp_path / "out"
    result = sweep(spec, out, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    moesim = BUILD / "moesim"
    expected = [
        ("ws1_topk", f"mpirun -n 1 {moesim}"),
        (f"ws{many}_switch", f"mpirun -n {many} --oversubscribe {moesim}"),
        ("dense", f"mpirun -n 1 {moesim}"),
    ]
    for i, (name, launch) in enumerate(expected, 1):
        assert f"[{i}/3] {name} would run\n" in result.stdout, result.stdout
        assert (f"      {launch} train --config {out / name}.ini --out {out / name}.h5 "
                f"--overwrite 1\n"
                in result.stdout)
    assert "moe-layer-freq=1000" in result.stdout
    assert not out.exists()

    slurm = sweep(spec, out, "--dry-run", env={**os.environ, "SLURM_JOB_ID": "1"})
    assert f"srun --mpi=pmix -n {many} {moesim} train" in slurm.stdout
    assert "srun" not in sweep(spec, out, "--dry-run", "--launcher", "mpirun").stdout


def test_dry_run_piped_into_head_ends_quietly(tmp_path):
    seeds = ", ".join(str(seed) for seed in range(2000))  # more output than a pipe holds
    spec = write(tmp_path / "spec.ini",
                 f"[sweep]\nworld-size = 1\n[base]\n{TINY}[grid]\nseed = {seeds}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(f"{SWEEP} {spec} --out {tmp_path / 'out'} --moesim "
                            f"{BUILD / 'moesim'} --dry-run | head -n 1", shell=True, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("sweep ") and "2000 points" in result.stdout, result.stdout
    assert result.stderr == "", result.stderr


def test_dry_run_of_a_finished_sweep_would_skip_and_touches_nothing(two_point):
    spec, out, _ = two_point
    before = snapshot(out)
    result = sweep(spec, out, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/2] ecf0.5 would skip (record complete)" in result.stdout
    assert "[2/2] ecf0 would skip (record complete)" in result.stdout
    assert "warning" not in result.stdout

    # A spec changed since the records ran still skips them, but says so.
    changed = write(spec.with_name("changed.ini"),
                    spec.read_text().replace("train-iters = 6", "train-iters = 7"))
    result = sweep(changed, out, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"warning: the spec now gives ecf0 another config than {out / 'ecf0.ini'}" in (
        result.stdout)
    assert snapshot(out) == before


@pytest.mark.parametrize("spec_text, message", [
    ("[sweep]\nworld-size = 1\n[grids]\nlr = 1\n", "unknown section [grids]"),
    ("[sweep]\nworld-size = 1\nmode = zip\n[grid]\nlr = 1, 2\nseed = 1, 2, 3\n",
     "mode = zip needs [grid] lists of equal length, but lr has 2, seed has 3 values"),
    ("[sweep]\nworld-size = 1\n[grid]\nmoe-router-typ = topk, switch\n",
     "[grid]: moe-router-typ is not a moesim key (did you mean moe-router-type?)"),
    ("[sweep]\nworld-size = 1\n[point a]\nlearning-rate = 1\n",
     "[point a]: learning-rate is not a moesim key"),
    ("[grid]\nlr = 1, 2\n", "no world-size: set world-size = N"),
    ("[sweep]\nworld-size = two\n[grid]\nlr = 1\n", "world-size = two: give a positive whole"),
    ("[sweep]\nworld-size = 1\nmode = cartesian\n[grid]\nlr = 1\n", "mode = cartesian"),
    ("[sweep]\nworld-size = 1\nbase-config = missing.ini\n[grid]\nlr = 1\n",
     "base-config = missing.ini: no such file"),
    ("[sweep]\nworld-size = 1\n[base]\nout = x.h5\n[grid]\nlr = 1\n", "[base] sets out"),
    ("[sweep]\nworld-size = 1\nranks = 2\n[grid]\nlr = 1\n", "[sweep] ranks is not a sweep"),
    ("[sweep]\nworld-size = 1\n[grid]\nlr = 1, 1\n", "[grid] lr lists 1 twice"),
    ("[sweep]\nworld-size = 1\n[base]\nlr = 1\n", "no points"),
])
def test_malformed_spec_exits_2_with_one_message_before_running(tmp_path, spec_text, message):
    spec = write(tmp_path / "spec.ini", spec_text)
    out = tmp_path / "out"
    result = sweep(spec, out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"sweep: error: {spec}: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_point_names():
    assert grid_point_names(["moe-router-type", "moe-expert-capacity-factor"],
                            [("switch", "0.5"), ("topk", "0")]) == ["switch_ecf0.5", "topk_ecf0"]
    assert grid_point_names(["world-size", "lr", "train-iters"],
                            [("4", "1e-3", "300")]) == ["ws4_lr1e-3_ti300"]
    # Labels that coincide (both 'rt') keep the key's words.
    assert grid_point_names(["moe-router-type", "moe-router-topk"],
                            [("topk", "2")]) == ["topk_router-topk2"]
    assert grid_point_names(["data-path"], [("/data/a corpus.txt",)]) == ["data-a-corpus.txt"]
    # Parts that run together fall back to <key>-<value> joined by '__'.
    assert grid_point_names(["a", "b"], [("x_y", "z"), ("x", "y_z")]) == [
        "a-x_y__b-z", "a-x__b-y_z"]
    with pytest.raises(SpecError, match="two grid points get the name"):
        grid_point_names(["data-path"], [("/a/b",), ("/a b",)])
