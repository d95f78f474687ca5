"""The memory check before allocation: the analytic bytes per rank times the
ranks on the node against the memory the node has, here a memory cgroup we
make (as SLURM confines a job), so the verdict does not depend on how much
memory this machine happens to have free."""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from moesim_run import BUILD, clean_env, flags

# Activation-heavy and quick: about 0.6 GB per rank, one step in a few seconds.
CONFIG = {"num-layers": 4, "hidden-size": 64, "num-attention-heads": 2, "seq-length": 256,
          "micro-batch-size": 64, "num-experts": 4, "moe-ffn-hidden-size": 64,
          "ffn-hidden-size": 128, "eval-iters": 1, "data-format": "synthetic",
          "synthetic-tokens": 200000, "train-iters": 1}
TIMEOUT = 120
MB = 1 << 20


def memory_cgroup(name):
    """A new memory cgroup and the files that set its limit (v1 or v2)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "memory" in v2.read_text().split():
        group, limit_file = Path("/sys/fs/cgroup") / name, "memory.max"
    else:
        group, limit_file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup at {group} ({e}); needs root and cgroupfs")
    return group, group / limit_file


@pytest.fixture
def cgroup():
    group, limit = memory_cgroup(f"moesim_test_{os.getpid()}")
    yield group, limit
    for _ in range(50):  # its processes have exited; the kernel frees it shortly
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def run_in(group, ranks, out):
    """moesim (under mpirun for ranks > 1) with every process in the cgroup."""
    cmd = [str(BUILD / "moesim"), "train", *flags({**CONFIG, "out": out})]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", *cmd]
    procs = group / "cgroup.procs"
    enter = f'echo $$ > "{procs}" && exec "$@"'
    return subprocess.run(["sh", "-c", enter, "sh", *cmd], env=clean_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def needed_per_rank(output):
    found = re.search(r"needs ([0-9.]+) GB per rank", output)
    assert found, output
    return float(found.group(1)) * 1e9


def test_ranks_on_a_node_must_fit_together(cgroup, tmp_path):
    group, limit = cgroup
    # Too small for one rank: refused before allocating, with the numbers.
    limit.write_text(str(300 * MB))
    small = run_in(group, 1, tmp_path / "small.h5")
    assert small.returncode != 0, small.stdout
    per_rank = needed_per_rank(small.stderr)
    assert "x 1 rank(s) on this node" in small.stderr and not (tmp_path / "small.h5").exists()
    assert per_rank > 2 * 300 * MB / 1.5, "the config no longer needs much memory"

    # Room for one rank and a half: one rank trains, two on this node are refused.
    limit.write_text(str(int(1.5 * per_rank + 150 * MB)))
    one = run_in(group, 1, tmp_path / "one.h5")
    assert one.returncode == 0, one.stdout + one.stderr
    two = run_in(group, 2, tmp_path / "two.h5")
    output = two.stdout + two.stderr
    assert two.returncode != 0, output
    assert "x 2 rank(s) on this node" in output, output
    assert 2 * needed_per_rank(output) > 1.5 * per_rank, output
    assert output.count("moesim: error:") == 1, output
    assert not (tmp_path / "two.h5").exists()
