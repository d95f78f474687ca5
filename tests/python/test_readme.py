"""Every command block of README.md runs verbatim from the root of a fresh
copy of the repository, in README order (later blocks use what earlier ones
wrote, as a reader following along would), so the README and the code cannot
drift.

Blocks: fenced ```sh blocks run under bash -e, ```python blocks under
/usr/bin/python3; ```text is a synopsis, not commands. A block fenced
```sh no-test is not run; each must be listed in NOT_RUN with the reason,
and every entry of NOT_RUN must still be in the README. Inline `code` in
prose and tables is not extracted.

The copy holds the working tree's files (what a clone of this commit holds)
and a copy of the test's build tree with its timestamps, so `make` in it
only relinks what the revision stamp changes instead of compiling for
minutes. The environment is the suite's (as root: OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which the README asks root to export).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moesim_run import BUILD, clean_env

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 300

# First line of each ```sh no-test block -> why it cannot run here.
NOT_RUN = {
    "make run    # train the default MoE transformer on 2 MPI ranks (fortunes corpus) -> "
    "runs/default.h5":
        "`make test` is this suite itself, and `make run` trains 500 steps for minutes; the "
        "next block is the same first steps with experiments/tiny.ini",
    "module load openmpi hdf5/parallel openblas inih   # EasyBuild-style names; Spack: e.g.":
        "environment modules exist on clusters only; test_build.py builds with every "
        "dependency given through the variables instead",
    "make HDF5_DIR=$HDF5_DIR BLAS_CFLAGS=-I$OPENBLAS_ROOT/include BLAS_LIBS=\"-L$OPENBLAS_ROOT"
    "/lib -lopenblas\"":
        "HDF5_DIR and OPENBLAS_ROOT come from a cluster's modules; test_build.py covers "
        "HDF5_DIR, BLAS_CFLAGS and BLAS_LIBS with Debian's paths",
    "mkdir -p runs/slurm":
        "sbatch needs a SLURM cluster; `make test-slurm` (root) submits both templates to one",
    "tests/multinode/cluster.sh up        # MOESIM_CLUSTER_NODES=2 _SLOTS=2 _RATE=1gbit _ID=mn "
    "_NET=10.213.14":
        "network namespaces and veth links need root and machine-global names; "
        "`make test-multinode` runs this cluster",
}


def readme_blocks():
    """(info string, first line number, text) of every fenced block."""
    blocks, info, start, lines = [], None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        fence = re.match(r"^```(.*)$", line)
        if fence and info is None:
            info, start, lines = fence.group(1).strip(), number + 1, []
        elif fence:
            blocks.append((info, start, "\n".join(lines) + "\n"))
            info = None
        elif info is not None:
            lines.append(line)
    assert info is None, "README.md ends inside a fenced block"
    return blocks


def runnable_blocks():
    return [(info, start, text) for info, start, text in readme_blocks()
            if info in ("sh", "python")]


def test_every_block_not_run_is_listed_with_its_reason():
    not_run = {text.splitlines()[0] for info, _, text in readme_blocks() if info == "sh no-test"}
    assert not_run == set(NOT_RUN)
    infos = {info for info, _, _ in readme_blocks()}
    assert infos <= {"sh", "sh no-test", "python", "text"}, infos
    assert len(runnable_blocks()) >= 9


def fresh_copy(destination: Path):
    """The working tree's files (tracked and new, not ignored) and the build
    tree, timestamps kept."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO / name
        if not source.exists():  # deleted in the working tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    build = destination / "build"
    for name in ("obj", "deps"):
        if (BUILD / name).exists():
            shutil.copytree(BUILD / name, build / name, symlinks=True)
    for name in ("libmoesim.a", "moesim", "revision"):
        if (BUILD / name).exists():
            shutil.copy2(BUILD / name, build / name)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme") / "moesim"
    fresh_copy(root)
    assert not (root / "runs").exists(), "a fresh clone has no runs/"
    return root


def run_block(info, text, cwd):
    command = ["bash", "-e", "-o", "pipefail", "-c", text] if info == "sh" else \
        ["/usr/bin/python3", "-c", text]
    env = clean_env()
    env["MPLBACKEND"] = "Agg"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


def test_readme_blocks_run_verbatim_in_order(clone):
    for info, start, text in runnable_blocks():
        result = run_block(info, text, clone)
        assert result.returncode == 0, (f"README.md line {start} ({info}) failed:\n{text}\n"
                                        f"--- stdout\n{result.stdout[-3000:]}\n"
                                        f"--- stderr\n{result.stderr[-3000:]}")
    # What the blocks say they make is there.
    assert (clone / "runs" / "tiny.h5").stat().st_size > 0
    assert (clone / "runs" / "tiny-ck" / "latest_checkpointed_iteration.txt").exists()
    assert sorted(p.name for p in (clone / "runs" / "tiny-figures").glob("*.png"))
    assert (clone / "runs" / "tiny-figures" / "run_overview.ipynb").exists()  # executed copy
    assert not list((clone / "analysis" / "notebooks").glob("*.nbconvert.ipynb"))
    assert not (clone / "analysis" / "notebooks" / "runs").exists()


def test_notebook_names_the_absolute_path_of_a_missing_record(clone):
    command = ("MOESIM_RUN=runs/no-such-run.h5 MOESIM_FIGURES=runs/missing jupyter nbconvert "
               "--to notebook --execute analysis/notebooks/run_overview.ipynb "
               "--output-dir runs/missing")
    result = run_block("sh", command, clone)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{clone}/runs/no-such-run.h5: no such file" in output, output[-3000:]
