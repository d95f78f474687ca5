"""records: whether a point's run record is finished, and the sweep's
index.csv (one row per point, rewritten whole after every point)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py

INDEX_NAME = "index.csv"
INDEX_COLUMNS = ("point", "status", "record", "returncode", "elapsed_s", "world_size")
STATUSES = ("done", "failed", "skipped", "pending")


def record_status(path: Path) -> str:
    """The record's `status` attribute ('complete', 'running', 'failed', 'diverged'), or
    'missing', 'unreadable', 'no status'. No file locking: a run in progress
    holds its record open for writing."""
    if not path.exists():
        return "missing"
    try:
        with h5py.File(path, "r", locking=False) as f:
            status = f.attrs.get("status")
    except (OSError, ValueError):
        return "unreadable"
    if status is None:
        return "no status"
    return status.decode() if isinstance(status, bytes) else str(status)


def grid_column(key: str) -> str:
    """Grid keys as the analysis package names config columns (moe_router_type),
    so index.csv merges with load_runs(...).config on point == run."""
    return key.replace("-", "_")


def read_index(out_dir: Path) -> dict:
    """Rows of an existing index.csv by point name; {} if there is none."""
    try:
        with open(out_dir / INDEX_NAME, newline="") as f:
            return {row["point"]: row for row in csv.DictReader(f) if row.get("point")}
    except (OSError, csv.Error, KeyError):
        return {}


def write_index(out_dir: Path, rows: list, grid_columns: list):
    """Writes index.csv atomically (a reader never sees half a file)."""
    columns = [*INDEX_COLUMNS, *(c for c in grid_columns if c not in INDEX_COLUMNS)]
    partial = out_dir / (INDEX_NAME + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, out_dir / INDEX_NAME)
