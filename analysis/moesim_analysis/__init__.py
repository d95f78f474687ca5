"""moesim_analysis: moesim run records (HDF5, docs/run-record.md) as pandas
DataFrames and matplotlib figures.

    from moesim_analysis import load_run, load_runs, plots
    run = load_run("runs/default.h5")
    plots.loss_curves(run, save="loss.png")
"""
from . import experiment_plots, experiments, paths, plots
from .projection import Projection, ProjectionError, project, read_projection
from .record import PHASES, SCHEMA_VERSION, RecordError, Run, load_run
from .sweep import RunSet, load_runs, summarize_runs, varying_config_columns

__all__ = ["PHASES", "Projection", "ProjectionError", "SCHEMA_VERSION", "RecordError", "Run",
           "RunSet", "experiment_plots", "experiments", "load_run", "load_runs", "paths", "plots",
           "project", "read_projection", "summarize_runs", "varying_config_columns"]
