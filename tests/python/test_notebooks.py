"""The analysis notebooks (analysis/notebooks) run headless from top to bottom.

Each is executed with nbclient on the python3 kernel, pointed by the
MOESIM_RUN / MOESIM_RUNS / MOESIM_FIGURES environment variables at small
records in a temporary directory: synthetic records always, and real runs of
build/moesim when it writes the schema the package reads. A cell error fails
the test, and every figure the notebook promises must appear as a PNG in the
figure dir. The committed notebooks carry no outputs.
"""
import sys
from pathlib import Path

import pytest

from moesim_run import (execute_notebook, needs_matching_build, read_clean_notebook, run_moesim,
                        write_synthetic_record)

ANALYSIS = Path(__file__).resolve().parents[2] / "analysis"
sys.path.insert(0, str(ANALYSIS))
from moesim_analysis import SCHEMA_VERSION  # noqa: E402

NEEDS_MATCHING_BUILD = needs_matching_build(SCHEMA_VERSION)

SWEEP_KEY = "moe_expert_capacity_factor"
CAPACITY_FACTORS = (1.0, 1.5)
OVERVIEW_FIGURES = ("loss_curves", "expert_load", "drop_rate", "router_logits", "phase_time",
                    "traffic", "specialization", "mutual_information")
COMPARE_FIGURES = ("loss_curves", f"final_eval_loss_vs_{SWEEP_KEY}",
                   f"drop_rate_vs_{SWEEP_KEY}", f"tokens_per_s_vs_{SWEEP_KEY}")
SMALL_RUN = {
    "num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
    "num-experts": 4, "moe-ffn-hidden-size": 32, "ffn-hidden-size": 64, "train-iters": 20,
    "eval-interval": 10, "eval-iters": 1, "data-format": "synthetic", "synthetic-tokens": 20000,
    "micro-batch-size": 2, "progress-interval": 100,
}


def assert_figures(figure_dir, names):
    missing = [name for name in names if not (figure_dir / f"{name}.png").is_file()]
    assert not missing, f"figures not written to {figure_dir}: {missing}; " \
                        f"found {sorted(p.name for p in figure_dir.iterdir())}"


def shown_images(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def real_run(directory, capacity_factor=1.25):
    out = directory / f"cf{capacity_factor}.h5"
    result = run_moesim("train", {**SMALL_RUN, "moe-expert-capacity-factor": capacity_factor,
                                  "out": out}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(params=["synthetic", pytest.param("real", marks=NEEDS_MATCHING_BUILD)])
def sweep_dir(request, tmp_path):
    """Two records differing in the capacity factor: synthetic or from build/moesim."""
    directory = tmp_path / "runs"
    directory.mkdir()
    for seed, capacity_factor in enumerate(CAPACITY_FACTORS):
        if request.param == "real":
            real_run(directory, capacity_factor)
        else:
            write_synthetic_record(directory / f"cf{capacity_factor}.h5", seed=seed,
                                   config={SWEEP_KEY: capacity_factor})
    return directory


def test_run_overview_writes_every_figure(sweep_dir, tmp_path, monkeypatch):
    record = sorted(sweep_dir.glob("*.h5"))[0]
    figures = tmp_path / "figures"
    notebook = execute_notebook("run_overview.ipynb", monkeypatch, MOESIM_RUN=record,
                       MOESIM_FIGURES=figures)
    assert_figures(figures, OVERVIEW_FIGURES)
    assert shown_images(notebook) >= len(OVERVIEW_FIGURES), "figures are not shown inline"


def test_compare_runs_writes_every_figure(sweep_dir, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    notebook = execute_notebook("compare_runs.ipynb", monkeypatch, MOESIM_RUNS=sweep_dir / "*.h5",
                       MOESIM_FIGURES=figures)
    assert_figures(figures, COMPARE_FIGURES)
    assert shown_images(notebook) >= len(COMPARE_FIGURES), "figures are not shown inline"
    summary_cell = next(cell for cell in notebook.cells if "summarize_runs(runs)" in cell.source
                        and "summary =" in cell.source)
    table = summary_cell.outputs[0]["data"]["text/plain"]
    assert all(f"cf{cf}" in table for cf in CAPACITY_FACTORS), table


@pytest.mark.parametrize("notebook_name", ["run_overview.ipynb", "compare_runs.ipynb"])
def test_committed_notebooks_have_no_outputs(notebook_name):
    read_clean_notebook(notebook_name)


PROJECTION_FIGURES = ("step_time_by_phase", "imbalance_cost", "internode_bytes")


@NEEDS_MATCHING_BUILD
def test_projection_notebook_writes_every_figure(tmp_path, monkeypatch):
    """A dropless record with one sequence per routing group, swept over EP,
    dispatcher and capacity factor on the H100 preset."""
    record = tmp_path / "dropless.h5"
    result = run_moesim("train", {**SMALL_RUN, "micro-batch-size": 8, "train-iters": 4,
                                  "moe-group-size": 16, "moe-expert-capacity-factor": 0,
                                  "out": record}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = tmp_path / "figures"
    notebook = execute_notebook("projection.ipynb", monkeypatch, MOESIM_RUN=record,
                                MOESIM_FIGURES=figures)
    assert_figures(figures, PROJECTION_FIGURES)
    assert shown_images(notebook) >= len(PROJECTION_FIGURES), "figures are not shown inline"
    table = next(cell for cell in notebook.cells if "sweep = pd.DataFrame" in cell.source)
    text = table.outputs[-1]["data"]["text/plain"]
    assert "hier" in text and "cf 1.0" in text, text


def test_projection_notebook_has_no_outputs():
    read_clean_notebook("projection.ipynb")
