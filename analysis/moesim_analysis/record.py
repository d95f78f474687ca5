"""record: reads one moesim run record (HDF5, schema 10 down to 3, docs/run-record.md)
into a `Run` of pandas DataFrames. `load_run` is the entry point; every problem
with the file is a `RecordError` that names the path and the fix."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

SCHEMA_VERSION = 10
# Oldest schema still read: 4 only added datasets, which read as NaN from a
# schema-3 record, and 5 only root attributes (the platform: BLAS kernel,
# threads, denormals), absent from `Run.attrs` of older records, so a sweep
# recorded before an upgrade stays loadable.
MIN_SCHEMA_VERSION = 3
ADDED_IN_SCHEMA_4 = ("routing/expert_bias", "routing/mean_abs_logit", "routing/logsumexp_sq")
# Schema 7 added /timing/comm/... and /traffic/internode_bytes: an older
# record has empty `comm_timing` and `internode` frames.
FIRST_SCHEMA_WITH_COMM = 7
# Schema 10 added /traffic/shadowed_rows: an older record has an empty
# `shadowing` frame.
FIRST_SCHEMA_WITH_SHADOWED_ROWS = 10
# The communication kinds of /timing/comm/{exposed,in_flight}/<kind>, and the
# stages of /timing/comm/hierarchical/<direction>_<stage>.
COMM_KINDS = ("dispatch", "combine", "grad_reduce")
COMM_DATASETS = (tuple(f"{what}/{kind}" for what in ("exposed", "in_flight")
                       for kind in COMM_KINDS) +
                 tuple(f"hierarchical/{direction}_{stage}" for direction in ("dispatch", "combine")
                       for stage in ("gather", "leaders", "scatter")))

# The order docs/run-record.md lists the step phases in: roughly the order they
# run, so stacked time bars read bottom-up like a step.
PHASES = ("attention", "router", "dispatch", "experts", "combine", "grad_allreduce",
          "optimizer", "other")

TRAIN_COLUMNS = ("loss", "aux_loss", "z_loss", "importance_loss", "load_loss", "lr", "grad_norm",
                 "tokens_per_s", "step_time_s")
# Per-expert routing datasets [S, L, E] -> column name in `Run.routing`.
ROUTING_EXPERT_COLUMNS = {"tokens_per_expert": "tokens", "processed_per_expert": "processed",
                          "dropped_per_expert": "dropped", "importance": "importance",
                          "mean_prob": "mean_prob", "expert_bias": "expert_bias"}
# Per-layer routing datasets [S, L], named as in the file.
ROUTING_LAYER_COLUMNS = ("entropy", "load_cv", "max_over_mean_load", "unused_experts",
                         "aux_loss", "z_loss", "importance_loss", "load_loss", "mean_abs_logit",
                         "logsumexp_sq")
CONFIG_PREFIX = "config."


class RecordError(ValueError):
    """A file that cannot be read as a moesim run record; the message names the path and the fix."""


class TornReadError(RecordError):
    """Datasets that disagree, or a read HDF5 refused, in a file that opened
    fine. HDF5 gives a reader no snapshot: when the run writing the record
    flushes while we read, we see part of two flushes. Retried by load_run."""


# A flush takes milliseconds, but a small model can flush every fraction of a
# second while a loaded machine stretches our read of every dataset over
# several of them: 3 attempts 0.05 s apart once all overlapped a flush. Like
# `moesim info`, keep trying for 2 s.
READ_ATTEMPTS = 40
RETRY_DELAY_S = 0.05
TORN_READ_ADVICE = ("If the run is still writing this record, a flush came during the read: "
                    "load it again; otherwise the file is damaged (killed mid-flush?).")


@dataclass(eq=False, repr=False)
class Run:
    """One run record as pandas DataFrames.

    Layer numbers (`layer` columns) are MoE-layer indices 0..L-1 in layer order,
    not transformer block indices: with --moe-layer-freq 2 the first MoE layer
    is layer 0 here whichever block holds it.

    train:              step, loss, aux_loss, z_loss, importance_loss, load_loss, lr,
                        grad_norm, tokens_per_s, step_time_s
    eval:               step, loss
    routing:            step, layer, expert, tokens, processed, dropped, importance, mean_prob,
                        expert_bias (tokens = router demand before capacity,
                        processed + dropped = tokens)
    routing_layers:     step, layer, entropy, load_cv, max_over_mean_load, unused_experts,
                        aux_loss, z_loss, importance_loss, load_loss, mean_abs_logit,
                        logsumexp_sq
    (schema-3 records have no expert_bias, mean_abs_logit, logsumexp_sq: NaN there)
    timing:             step, rank, phase, seconds (the phases of /timing, which sum to the
                        step; the sub-breakdowns under /timing/comm are in comm_timing)
    comm_timing:        step, rank, one column per /timing/comm dataset, '/' written as '_'
                        (exposed_dispatch, in_flight_combine, hierarchical_dispatch_gather, ...),
                        and exposed, in_flight, hidden: summed over the kinds, hidden =
                        in_flight - exposed (empty before schema 7)
    traffic:            step, src, dst, bytes (token rows src sent to dst in the forward dispatch)
    internode:          step, src_node, dst_node, bytes (token-row bytes of every MoE exchange
                        of the step, forward and backward, from node to node; empty before 7)
    shadowing:          step, layer, rows (expert rows their source rank computed with a shadow
                        of the expert, --moe-expert-shadowing, summed over ranks; 0 without it;
                        empty before schema 10)
    specialization:     eval_step, layer, expert, category, count
    mutual_information: eval_step, layer, bits
    config:             {key: value} from the `config.<key>` attributes, '-' written as '_'
    attrs:              every other root attribute (schema_version, world_size, hostnames, ...)
    """

    path: Path
    status: str
    config: dict
    attrs: dict
    train: pd.DataFrame
    eval: pd.DataFrame
    routing: pd.DataFrame
    routing_layers: pd.DataFrame
    timing: pd.DataFrame
    comm_timing: pd.DataFrame
    traffic: pd.DataFrame
    internode: pd.DataFrame
    shadowing: pd.DataFrame
    specialization: pd.DataFrame
    mutual_information: pd.DataFrame
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.path.stem

    def __repr__(self):
        return (f"Run({str(self.path)!r}, status={self.status!r}, logged_steps={len(self.train)}, "
                f"evals={len(self.eval)}, world_size={self.attrs.get('world_size')})")


def load_run(path) -> Run:
    """Reads the run record at `path`. Records of a run still going (or killed)
    load too, holding the steps up to the last flush; check `run.status`."""
    path = Path(path)
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_run(path)
        except TornReadError:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            time.sleep(RETRY_DELAY_S)


def _read_run(path: Path) -> Run:
    with _open_record(path) as f:
        _check_schema(f, path)
        try:
            return _run_from_file(f, path)
        except (OSError, RuntimeError) as err:  # h5py raises either for a torn read
            raise TornReadError(f"{path}: reading failed ({err}). {TORN_READ_ADVICE}") from err


def _run_from_file(f: h5py.File, path: Path) -> Run:
    config, attrs = _root_attributes(f)
    steps = _steps(f, "train/step", path)
    eval_steps = _steps(f, "eval/step", path)
    return Run(
        path=path, status=str(attrs.get("status", "unknown")), config=config, attrs=attrs,
        train=_train_frame(f, path, steps),
        eval=pd.DataFrame({"step": eval_steps, "loss": _rows(f, "eval/loss", path, eval_steps)}),
        routing=_routing_frame(f, path, steps),
        routing_layers=_routing_layers_frame(f, path, steps),
        timing=_timing_frame(f, path, steps),
        comm_timing=_comm_timing_frame(f, path, steps),
        traffic=_traffic_frame(f, path, steps),
        internode=_internode_frame(f, path, steps),
        shadowing=_shadowing_frame(f, path, steps),
        specialization=_specialization_frame(f, path, eval_steps),
        mutual_information=_long_frame(
            {"eval_step": eval_steps, "layer": None},
            {"bits": _rows(f, "specialization/mutual_information", path, eval_steps)}),
    )


# ---- opening and checking ------------------------------------------------------------

def _open_record(path: Path) -> h5py.File:
    if not path.exists():
        # The absolute path: a relative one says nothing when the reader runs
        # somewhere else than the user thinks (a notebook's kernel).
        raise RecordError(f"{path.absolute()}: no such file. Check the path, or write a record "
                          f"with `moesim train --out {path}`.")
    if path.is_dir():
        raise RecordError(f"{path} is a directory, not a run record. Pass one .h5 file, "
                          f"or a glob such as '{path}/*.h5' to load_runs.")
    if not h5py.is_hdf5(path):
        raise RecordError(f"{path} is not an HDF5 file, so not a moesim run record. Pass the "
                          f"file written by `moesim train --out`.")
    try:
        # No file locking: a run in progress holds its record open for writing,
        # and HDF5's lock would refuse us. A read that meets one of its flushes
        # fails or disagrees with itself, and load_run reads again.
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        try:
            # HDF5 refuses a second open with other locking flags than a
            # handle this process already holds (an h5py.File in a notebook).
            return h5py.File(path, "r")
        except OSError:
            raise RecordError(f"{path} could not be opened as HDF5 ({err}); the file may be "
                              f"truncated or damaged.") from err


def _check_schema(f: h5py.File, path: Path):
    if "schema_version" not in f.attrs or "moesim_version" not in f.attrs:
        raise RecordError(f"{path} is an HDF5 file but not a moesim run record (no "
                          f"schema_version/moesim_version root attribute; a `--save` parameter "
                          f"file looks like this). Pass the file written by `moesim train --out`.")
    version = int(f.attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise RecordError(f"{path} has run record schema {version}, newer than the schema "
                          f"{SCHEMA_VERSION} this moesim_analysis reads. Use the analysis/ "
                          f"package from the moesim checkout that wrote the file.")
    if version < MIN_SCHEMA_VERSION:
        raise RecordError(f"{path} has run record schema {version}; moesim_analysis reads "
                          f"schemas {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION}. Re-run with a newer "
                          f"moesim.")


def _dataset(f: h5py.File, name: str, path: Path) -> np.ndarray:
    if name not in f:
        raise RecordError(f"{path}: dataset /{name} is missing, though schema {SCHEMA_VERSION} "
                          f"always has it; the file is damaged or was not written by moesim.")
    return f[name][()]


def _rows(f: h5py.File, name: str, path: Path, steps: np.ndarray, like: str = None) -> np.ndarray:
    """A time-series dataset, checked to have a row for every entry of `steps`
    and cut to them, so no frame can silently pair a value with the wrong step. A dataset newer
    than the record's schema reads as NaN in the shape of the dataset `like`."""
    if name in ADDED_IN_SCHEMA_4 and not _schema_at_least(f, 4):
        return np.full(_rows(f, like, path, steps).shape, np.nan)
    values = _dataset(f, name, path)
    if values.shape[0] < len(steps):
        raise TornReadError(f"{path}: /{name} has {values.shape[0]} rows but its step dataset "
                            f"has {len(steps)}. {TORN_READ_ADVICE}")
    if values.shape[0] > len(steps) and _run_ended(f):
        raise TornReadError(f"{path}: /{name} has {values.shape[0]} rows but its step dataset "
                            f"has {len(steps)}, and the run that wrote it has ended (status "
                            f"{_python_value(f.attrs['status'])!r}): the file is damaged. Re-run, "
                            f"or resume it from a checkpoint with --load.")
    # Series only grow: rows past the steps read before belong to a flush of
    # a live run under way, and the rows before them are whole.
    return values[:len(steps)]


# A run that closed its record wrote every series and its steps in one final
# flush, so they agree; a killed run's record still says running.
ENDED_STATUSES = ("complete", "diverged", "interrupted")


def _run_ended(f: h5py.File) -> bool:
    return _python_value(f.attrs.get("status", "")) in ENDED_STATUSES


def _steps(f: h5py.File, name: str, path: Path) -> np.ndarray:
    """A step dataset; rows that a live run's flush has allocated but not yet
    written read as zeros, so steps that do not rise are a torn read."""
    steps = _dataset(f, name, path)
    if len(steps) and (steps[0] < 0 or np.any(np.diff(steps) <= 0)):
        raise TornReadError(f"{path}: /{name} does not rise step by step. {TORN_READ_ADVICE}")
    return steps


def _python_value(value):
    """h5py's attribute value as plain Python: str for strings (variable or
    fixed length), int/float for scalars, list of str for string arrays."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [_python_value(v) for v in value.tolist()]
    return value


def _root_attributes(f: h5py.File) -> tuple[dict, dict]:
    config, attrs = {}, {}
    for name, value in f.attrs.items():
        if name.startswith(CONFIG_PREFIX):
            config[name[len(CONFIG_PREFIX):]] = _python_value(value)
        else:
            attrs[name] = _python_value(value)
    return config, attrs


# ---- frames --------------------------------------------------------------------------

def _long_frame(axes: dict, columns: dict) -> pd.DataFrame:
    """One row per combination of the axes (in order, the arrays' dimensions),
    with each column array flattened beside them. An axis given as None is the
    index 0..n-1 of that dimension."""
    shape = next(iter(columns.values())).shape
    labels = [np.arange(n) if values is None else np.asarray(values)
              for values, n in zip(axes.values(), shape)]
    grids = np.meshgrid(*labels, indexing="ij") if labels else []
    data = {axis: grid.reshape(-1) for axis, grid in zip(axes, grids)}
    data.update({name: np.asarray(values).reshape(-1) for name, values in columns.items()})
    return pd.DataFrame(data)


def _train_frame(f, path, steps) -> pd.DataFrame:
    columns = {"step": steps}
    columns.update({name: _rows(f, f"train/{name}", path, steps) for name in TRAIN_COLUMNS})
    return pd.DataFrame(columns)


def _routing_frame(f, path, steps) -> pd.DataFrame:
    columns = {column: _rows(f, f"routing/{name}", path, steps, like="routing/mean_prob")
               for name, column in ROUTING_EXPERT_COLUMNS.items()}
    return _long_frame({"step": steps, "layer": None, "expert": None}, columns)


def _routing_layers_frame(f, path, steps) -> pd.DataFrame:
    columns = {name: _rows(f, f"routing/{name}", path, steps, like="routing/entropy")
               for name in ROUTING_LAYER_COLUMNS}
    return _long_frame({"step": steps, "layer": None}, columns)


def _phase_order(names) -> list:
    """Documented phases first, in their order, then any the writer added."""
    known = [p for p in PHASES if p in names]
    return known + sorted(set(names) - set(known))


def _timing_frame(f, path, steps) -> pd.DataFrame:
    if "timing" not in f:
        raise RecordError(f"{path}: group /timing is missing; the file is damaged or was not "
                          f"written by moesim.")
    frames = []
    # Only the datasets right under /timing are phases; groups (/timing/comm)
    # break a phase down further and must not be added to the step.
    phases = [name for name, item in f["timing"].items() if isinstance(item, h5py.Dataset)]
    for phase in _phase_order(phases):
        seconds = _rows(f, f"timing/{phase}", path, steps)
        frame = _long_frame({"step": steps, "rank": None}, {"seconds": seconds})
        frame.insert(2, "phase", phase)
        frames.append(frame)
    frames = frames or [pd.DataFrame(columns=["step", "rank", "phase", "seconds"])]
    return pd.concat(frames, ignore_index=True).sort_values(["step", "rank"], kind="stable",
                                                            ignore_index=True)


def _schema_at_least(f, version: int) -> bool:
    return int(f.attrs["schema_version"]) >= version


def _comm_timing_frame(f, path, steps) -> pd.DataFrame:
    if not _schema_at_least(f, FIRST_SCHEMA_WITH_COMM):
        return pd.DataFrame(columns=["step", "rank", "exposed", "in_flight", "hidden"])
    columns = {name.replace("/", "_"): _rows(f, f"timing/comm/{name}", path, steps)
               for name in COMM_DATASETS}
    frame = _long_frame({"step": steps, "rank": None}, columns)
    for total in ("exposed", "in_flight"):
        parts = [f"{total}_{kind}" for kind in COMM_KINDS]
        frame[total] = frame[parts].sum(axis=1, skipna=False)
    frame["hidden"] = frame["in_flight"] - frame["exposed"]
    return frame


def _internode_frame(f, path, steps) -> pd.DataFrame:
    if not _schema_at_least(f, FIRST_SCHEMA_WITH_COMM):
        return pd.DataFrame(columns=["step", "src_node", "dst_node", "bytes"])
    internode_bytes = _rows(f, "traffic/internode_bytes", path, steps)
    return _long_frame({"step": steps, "src_node": None, "dst_node": None},
                       {"bytes": internode_bytes})


def _shadowing_frame(f, path, steps) -> pd.DataFrame:
    if not _schema_at_least(f, FIRST_SCHEMA_WITH_SHADOWED_ROWS):
        return pd.DataFrame(columns=["step", "layer", "rows"])
    return _long_frame({"step": steps, "layer": None},
                       {"rows": _rows(f, "traffic/shadowed_rows", path, steps)})


def _traffic_frame(f, path, steps) -> pd.DataFrame:
    dispatch_bytes = _rows(f, "traffic/dispatch_bytes", path, steps)
    return _long_frame({"step": steps, "src": None, "dst": None}, {"bytes": dispatch_bytes})


def _category_names(f, path, categories: int) -> list:
    counts = f["specialization/counts"]
    names = counts.attrs.get("category_names", f.attrs.get("category_names"))
    names = [] if names is None else _python_value(names)
    if len(names) != categories:
        raise RecordError(f"{path}: /specialization/counts has {categories} categories but "
                          f"category_names lists {len(names)}; the file is inconsistent.")
    return names


def _specialization_frame(f, path, eval_steps) -> pd.DataFrame:
    spec_steps = _dataset(f, "specialization/step", path)[:len(eval_steps)]
    if not np.array_equal(spec_steps, eval_steps):
        raise TornReadError(f"{path}: /specialization/step {spec_steps.tolist()} differs from "
                            f"/eval/step {eval_steps.tolist()}. {TORN_READ_ADVICE}")
    counts = _rows(f, "specialization/counts", path, eval_steps)
    names = _category_names(f, path, counts.shape[3])
    return _long_frame({"eval_step": eval_steps, "layer": None, "expert": None,
                        "category": names}, {"count": counts})
