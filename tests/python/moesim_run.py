"""Launching build/moesim from tests: a plain subprocess (an MPI singleton) or
under mpirun, with the environment of any enclosing mpirun removed. Also the
record schema the binary writes, and synthetic records of the schema for tests of
the analysis package that need no run."""
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

BUILD = Path(os.environ.get("MOESIM_BUILD", Path(__file__).resolve().parents[2] / "build"))


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` at path, unmounted on the way out."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS="1")
    return env


def flags(options):
    return [arg for key, value in options.items() for arg in (f"--{key}", str(value))]


def final_checkpoint(save_dir):
    """The newest complete checkpoint of a --save directory."""
    save_dir = Path(save_dir)
    iteration = int((save_dir / "latest_checkpointed_iteration.txt").read_text())
    return save_dir / f"iter_{iteration:07d}.h5"


def rank_pids(out):
    """The training ranks writing the record out (not mpirun: a rank's command
    line starts with the binary)."""
    found = subprocess.run(["pgrep", "-f", f"^{BUILD / 'moesim'} train .*{out}"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def read_everything(path):
    """Every attribute (as "/@name") and dataset of an HDF5 file through h5py;
    raises if any of them cannot be read."""
    values = {}
    with h5py.File(path, "r") as f:
        values.update({f"/@{k}": v for k, v in f.attrs.items()})
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return values


def moesim_info(path):
    """`moesim info path`, captured."""
    return subprocess.run([str(BUILD / "moesim"), "info", str(path)], env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def run_moesim(subcommand, options, timeout=600):
    return subprocess.run([str(BUILD / "moesim"), subcommand, *flags(options)],
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def run_mpi(ranks, subcommand, options, timeout=120):
    """Runs build/moesim under `mpirun -n ranks` (oversubscribed, unbound) and
    returns a CompletedProcess with .elapsed (seconds). mpirun runs in its own
    session; on timeout that whole process group is killed (so no rank is left
    spinning) and subprocess.TimeoutExpired is raised."""
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
           str(BUILD / "moesim"), subcommand, *flags(options)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    result.elapsed = time.monotonic() - start
    return result


def train_record(options, ranks=1, timeout=120):
    """`moesim train` with `options` (their "out" is the record), as a plain
    process for 1 rank or under mpirun for more; fails the calling test with
    the program's output unless it succeeds. Returns options["out"]."""
    result = (run_moesim("train", options, timeout=timeout) if ranks == 1
              else run_mpi(ranks, "train", options, timeout=timeout))
    assert result.returncode == 0, f"{options['out']}:\n{result.stdout}{result.stderr}"
    return options["out"]


def record_schema_version():
    """The run record schema build/moesim writes (from `moesim --version`), or
    None if the binary is missing or does not say."""
    try:
        out = subprocess.run([str(BUILD / "moesim"), "--version"], env=clean_env(),
                             capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    match = re.search(r"run record schema (\d+)", out)
    return int(match.group(1)) if match else None


# Units of every dataset of schemas 4 and 5, as docs/run-record.md lists them.
RECORD_UNITS = {
    "train/step": "step", "train/loss": "nats/token", "train/aux_loss": "loss",
    "train/z_loss": "loss", "train/importance_loss": "loss",
    "train/load_loss": "loss", "train/lr": "1", "train/grad_norm": "1",
    "train/tokens_per_s": "tokens/s", "train/step_time_s": "s",
    "routing/tokens_per_expert": "assignments", "routing/processed_per_expert": "assignments",
    "routing/dropped_per_expert": "assignments", "routing/importance": "1",
    "routing/mean_prob": "1", "routing/entropy": "nats", "routing/load_cv": "1",
    "routing/max_over_mean_load": "1", "routing/unused_experts": "experts",
    "routing/aux_loss": "loss", "routing/z_loss": "loss", "routing/importance_loss": "loss",
    "routing/load_loss": "loss", "routing/expert_bias": "1", "routing/mean_abs_logit": "1",
    "routing/logsumexp_sq": "1", "traffic/dispatch_bytes": "bytes",
    "routing/group_counts_step": "step", "routing/group_expert_counts": "assignments",
    "routing/group_expert_drops": "assignments",
    "eval/step": "step", "eval/loss": "nats/token", "specialization/step": "step",
    "specialization/counts": "assignments", "specialization/mutual_information": "bits",
    **{f"timing/{phase}": "s" for phase in ("attention", "router", "dispatch", "experts",
                                            "combine", "grad_allreduce", "optimizer", "other")},
}
# What schema 7 added: communication times under /timing/comm and the
# node-to-node bytes.
COMM_KINDS = ("dispatch", "combine", "grad_reduce")
HIER_STAGES = tuple(f"{direction}_{stage}" for direction in ("dispatch", "combine")
                    for stage in ("gather", "leaders", "scatter"))
COMM_TIMING = (tuple(f"timing/comm/{what}/{kind}" for what in ("exposed", "in_flight")
                     for kind in COMM_KINDS) +
               tuple(f"timing/comm/hierarchical/{stage}" for stage in HIER_STAGES))
ADDED_IN_SCHEMA_7 = (*COMM_TIMING, "traffic/internode_bytes")
RECORD_UNITS.update({name: "s" for name in COMM_TIMING})
RECORD_UNITS["traffic/internode_bytes"] = "bytes"
# What schema 10 added: expert shadowing's rows per step and MoE layer.
RECORD_UNITS["traffic/shadowed_rows"] = "rows"


# Root attributes schema 5 added to schema 4, as a Zen 3 machine writes them.
PLATFORM_ATTRS = {
    "platform": "OpenBLAS 0.3.21 | kernel Zen (OpenBLAS's choice) | 1 BLAS thread per rank | "
                "denormals flushed (FTZ+DAZ)",
    "blas_library": "OpenBLAS 0.3.21", "blas_kernel": "Zen", "blas_kernel_chosen_by": "openblas",
    "blas_kernel_detected": "Zen", "blas_kernel_best": "Haswell", "blas_kernel_rejected": "",
    "blas_threads": 1, "denormals": "flushed", "cpu_features": "avx avx2 fma", "bf16_gemm": "none"}

# Datasets schema 4 added to schema 3.
ADDED_IN_SCHEMA_4 = ("routing/expert_bias", "routing/mean_abs_logit", "routing/logsumexp_sq")


def write_synthetic_record(path, steps=6, moe_layers=2, experts=4, ranks=2, evals=3,
                           categories=3, config=None, status="complete", seed=0, schema=10,
                           nodes=2):
    """Writes a run record of `schema` (10; 9 without the shadowed rows 10 added; 8 also without
    the group drops 9 added; 7 also without the
    group counts 8 added; 6 also without
    the datasets 7 added (communication times, internode_bytes) and node attributes, read like 5; 4
    without the platform attributes 5 added; 3 also without the datasets 4 added) laid out as
    docs/run-record.md says, with seeded random values that keep the
    documented relations (processed + dropped = tokens, unused
    experts, steps in order), and returns what it wrote: {"attrs": {name:
    value}, "<dataset path>": array, ...}."""
    rng = np.random.default_rng(seed)
    S, L, E, P, V, C = steps, moe_layers, experts, ranks, evals, categories
    config = {"num_layers": 2 * L, "hidden_size": 32, "num_experts": E, "moe_router_topk": 2,
              "moe_layer_freq": 2, "moe_expert_capacity_factor": 1.25, "micro_batch_size": 2,
              "seq_length": 16, "lr": 3e-3, "data_path": "synthetic", "out": str(path),
              **(config or {})}
    assignments = 2 * 64 * P  # top-2 of 64 tokens per rank
    tokens = rng.multinomial(assignments, np.full(E, 1 / E), size=(S, L))
    processed = np.minimum(tokens, assignments // E)  # capacity of an even share: some drops
    eval_steps = np.arange(V) * 10
    data = {
        "train/step": np.arange(1, S + 1), "eval/step": eval_steps,
        "specialization/step": eval_steps,
        "routing/tokens_per_expert": tokens, "routing/processed_per_expert": processed,
        "routing/dropped_per_expert": tokens - processed,
        "routing/unused_experts": (processed == 0).sum(axis=2),
        "routing/mean_prob": rng.dirichlet(np.ones(E), size=(S, L)),
        "routing/expert_bias": np.cumsum(rng.choice([-1e-3, 1e-3], size=(S, L, E)), axis=0),
        "traffic/dispatch_bytes": rng.integers(0, 10**6, size=(S, P, P)),
        "traffic/internode_bytes": rng.integers(0, 10**6, size=(S, nodes, nodes)),
        "specialization/counts": rng.integers(0, 50, size=(V, L, E, C)),
    }
    if schema >= 8:  # one routing group per rank's micro-batch
        data["routing/group_counts_step"] = data["train/step"]
        data["routing/group_expert_counts"] = rng.integers(0, 64, size=(S, L, P, E))
    if schema >= 9:  # every drop charged to the first group: the sums still hold
        drops = np.zeros((S, L, P, E), dtype=np.int64)
        drops[:, :, 0, :] = tokens - processed
        data["routing/group_expert_drops"] = drops
    if schema >= 10:
        data["traffic/shadowed_rows"] = rng.integers(0, 64, size=(S, L))
    float_shapes = {"train": (S,), "eval": (V,), "routing": (S, L, E), "timing": (S, P),
                    "specialization": (V, L)}
    for name in ("train/loss", "train/aux_loss", "train/z_loss",
                 "train/importance_loss", "train/load_loss", "train/lr", "train/grad_norm",
                 "train/tokens_per_s", "train/step_time_s", "eval/loss", "routing/importance",
                 *[name for name in RECORD_UNITS if name.startswith("timing/")],
                 "specialization/mutual_information"):
        data[name] = rng.random(float_shapes[name.split("/")[0]]) + 1.0
    for name in ("entropy", "load_cv", "max_over_mean_load", "aux_loss", "z_loss",
                 "importance_loss", "load_loss", "mean_abs_logit", "logsumexp_sq"):
        data[f"routing/{name}"] = rng.random((S, L))
    data = {name: np.asarray(values, dtype=np.float64 if values.dtype.kind == "f" else np.int64)
            for name, values in data.items()
            if (schema >= 4 or name not in ADDED_IN_SCHEMA_4) and
            (schema >= 7 or name not in ADDED_IN_SCHEMA_7)}
    attrs = {"schema_version": schema, "moesim_version": "0.1.0", "git_revision": "test",
             "status": status, "start_time": "2026-01-01T00:00:00Z",
             "end_time": "2026-01-01T00:01:00Z", "steps_done": S, "world_size": P,
             "ep_size": P, "seed": seed, "hostnames": [f"host{r}" for r in range(P)],
             "params_total": 123456, "params_active_per_token": 65432,
             "param_bytes_per_rank": np.full(P, 4000, dtype=np.int64),
             "record_flush_interval": 10,
             "config": "".join(f"{k.replace('_', '-')} = {v}\n" for k, v in config.items()),
             "category_names": [f"cluster{c}" for c in range(C)],
             **{f"config.{key}": value for key, value in config.items()}}
    if schema >= 5:
        attrs.update(PLATFORM_ATTRS)
    if schema >= 7:
        attrs.update({"num_nodes": nodes,
                      "node_of_rank": np.arange(P, dtype=np.int64) * nodes // P})
    _write_record(path, attrs, data)
    return {"attrs": attrs, **data}


def _write_record(path, attrs, data):
    """As moesim does: int64 and float64 attributes, variable-length UTF-8
    strings, extendible chunked datasets with a units attribute."""
    with h5py.File(path, "w") as f:
        for name, value in attrs.items():
            if isinstance(value, list):
                value = np.array(value, dtype=h5py.string_dtype())
            elif isinstance(value, int):
                value = np.int64(value)
            f.attrs[name] = value
        for name, values in data.items():
            dataset = f.create_dataset(name, data=values, maxshape=(None, *values.shape[1:]),
                                       chunks=True)
            dataset.attrs["units"] = RECORD_UNITS[name]
        f["specialization/counts"].attrs["category_names"] = f.attrs["category_names"]


NOTEBOOKS = Path(__file__).resolve().parents[2] / "analysis" / "notebooks"
NOTEBOOK_CELL_TIMEOUT_S = 120


def needs_matching_build(package_schema):
    """Skip marker for tests on real records when build/moesim writes another
    run-record schema than the analysis package reads."""
    build_schema = record_schema_version()
    return pytest.mark.skipif(
        build_schema != package_schema,
        reason=f"build/moesim writes run record schema {build_schema} (`build/moesim --version`), "
               f"moesim_analysis reads {package_schema}; " + (
                   "update the package to the newer schema"
                   if (build_schema or 0) > package_schema
                   else f"`make build/moesim` once schema {package_schema} lands"))


def read_clean_notebook(notebook_name):
    """analysis/notebooks/<notebook_name> as committed, checked to be a valid
    notebook with no outputs or execution counts and the python3 kernel."""
    import nbformat
    notebook = nbformat.read(NOTEBOOKS / notebook_name, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{notebook_name}: cells {dirty} hold outputs; clear them before committing"
    assert notebook.metadata.kernelspec.name == "python3"
    return notebook


def execute_notebook(notebook_name, monkeypatch, **environment):
    """Runs analysis/notebooks/<notebook_name> headless in its own directory (so
    its relative imports work) with the given environment variables; returns
    the executed notebook. Any cell error raises."""
    import nbformat
    from nbclient import NotebookClient
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    notebook = nbformat.read(NOTEBOOKS / notebook_name, as_version=4)
    client = NotebookClient(notebook, timeout=NOTEBOOK_CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook
