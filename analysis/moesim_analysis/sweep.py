"""sweep: several run records at once. `load_runs` concatenates each table of
`Run` over the runs, tagged with the run's name and its configuration, so a
sweep groups by any config key; `summarize_runs` makes one row per run."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .record import RecordError, Run, load_run

TABLES = ("train", "eval", "routing", "routing_layers", "timing", "comm_timing", "traffic",
          "internode", "shadowing", "specialization", "mutual_information")
# Attributes set by the launch rather than the config, yet what a sweep over
# rank counts varies; they join the config columns.
LAUNCH_ATTRIBUTES = ("world_size", "ep_size")
# Keys that change where or how often output is written, never the training,
# so two runs differing only in these ran the same experiment.
OUTPUT_ONLY_KEYS = ("out", "save", "progress_interval", "record_flush_interval")
CONFIG_COLUMN_PREFIX = "config_"


@dataclass(eq=False, repr=False)
class RunSet:
    """The tables of `Run` concatenated over runs. Each table has a `run`
    column (the file's stem, or its path when stems repeat) and one column per
    config key plus world_size and ep_size. A config key that is also a table
    column (`lr`: the step's learning rate vs the configured peak) is named
    `config_<key>` instead, in every table. `config` has one row per run."""

    runs: list
    config: pd.DataFrame
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

    def __repr__(self):
        return f"RunSet({[run.name for run in self.runs]})"

    def __iter__(self):
        return iter(self.runs)

    def __len__(self):
        return len(self.runs)


def load_runs(paths_or_glob) -> RunSet:
    """Loads several records: a glob string ('runs/sweep/*.h5', '**' allowed),
    one path, or a list of paths."""
    paths = _record_paths(paths_or_glob)
    runs = [load_run(path) for path in paths]
    for run, name in zip(runs, _run_names(paths)):
        run.name = name
    return _run_set(runs)


def _record_paths(paths_or_glob) -> list:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = str(paths_or_glob)
        if not glob.has_magic(pattern):
            return [Path(pattern)]
        paths = sorted(glob.glob(pattern, recursive=True))
        if not paths:
            raise RecordError(f"no run records match {os.path.abspath(pattern)!r}. Check the "
                              f"pattern and the directory.")
        return [Path(p) for p in paths]
    paths = [Path(p) for p in paths_or_glob]
    if not paths:
        raise RecordError("load_runs got an empty list of paths; pass at least one record.")
    return paths


def _run_names(paths: list) -> list:
    """File stems; when two stems repeat (sweep/a/run.h5, sweep/b/run.h5), the
    paths relative to their common directory, without the suffix."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    return [str(p.relative_to(common).with_suffix("")) for p in resolved]


def _config_columns(run: Run, reserved: set) -> dict:
    values = dict(run.config)
    values.update({name: run.attrs.get(name) for name in LAUNCH_ATTRIBUTES})
    return {(CONFIG_COLUMN_PREFIX + key if key in reserved else key): value
            for key, value in values.items()}


def _run_set(runs: list) -> RunSet:
    reserved = {"run"} | {column for run in runs for table in TABLES
                          for column in getattr(run, table).columns}
    columns = {run.name: _config_columns(run, reserved) for run in runs}
    tables = {table: pd.concat([getattr(run, table).assign(run=run.name, **columns[run.name])
                                for run in runs], ignore_index=True)
              for table in TABLES}
    for table in tables.values():
        table.insert(0, "run", table.pop("run"))
    config = pd.DataFrame([{"run": run.name, "path": str(run.path), "status": run.status,
                            **columns[run.name]} for run in runs])
    return RunSet(runs=runs, config=config, **tables)


def varying_config_columns(runs: RunSet) -> list:
    """The config columns whose value differs between runs (a sweep's axes),
    leaving out keys that only say where or how often output went."""
    skip = set(OUTPUT_ONLY_KEYS) | {"run", "path", "status"}
    return [column for column in runs.config.columns
            if column not in skip and runs.config[column].astype(str).nunique() > 1]


def summarize_runs(runs: RunSet, final_window: int = 10) -> pd.DataFrame:
    """One row per run: status, steps, final_train_loss (mean over the last
    `final_window` logged steps: one step's loss is one batch's, too noisy to
    compare runs), final_eval_loss (the last evaluation), tokens_per_s (median
    over logged steps, robust to the slow first steps), drop_rate (dropped /
    routed assignments over the whole run, all layers), then the config
    columns that vary between runs."""
    rows = [_summary_row(run, final_window) for run in runs]
    summary = pd.DataFrame(rows)
    axes = runs.config[["run"] + varying_config_columns(runs)]
    return summary.merge(axes, on="run", how="left")


def _summary_row(run: Run, final_window: int) -> dict:
    train, evaluation = run.train, run.eval
    tokens = run.routing["tokens"].sum()
    return {
        "run": run.name,
        "status": run.status,
        "steps": int(train["step"].max()) if len(train) else 0,
        "final_train_loss": train["loss"].tail(final_window).mean(),
        "final_eval_loss": evaluation["loss"].iloc[-1] if len(evaluation) else np.nan,
        "final_eval_step": evaluation["step"].iloc[-1] if len(evaluation) else np.nan,
        "tokens_per_s": train["tokens_per_s"].median(),
        "drop_rate": run.routing["dropped"].sum() / tokens if tokens else np.nan,
    }
