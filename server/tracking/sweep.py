"""A ``fedpriv simulate -m`` sweep: its jobs' MLflow runs nested under one parent run, and its
comparison page written when the sweep ends.

The parent is keyed on the sweep directory (``SweepDir.tracking_parent``): the first job that
needs it creates it, under a file lock, since a parallel launcher starts jobs together. A job
records the parent's id in its own run directory before its ServerApp starts (which may be
another process), and the ServerApp creates the job's run under it (``tracker.open_tracker``).
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from common.rundir import RunDir, SweepDir
from common.storage import atomic_write_json
from server.tracking import mlflow_client
from server.tracking.tracker import Tracker, kept_record, new_run


def link_job(cfg: dict, run_dir: Path, sweep_dir: Path, *, name: str) -> None:
    """Record in the job's run directory which parent run its MLflow run goes under (and its name)."""
    if cfg["tracking"]["name"] == "none" or kept_record(RunDir(run_dir).tracking):
        return  # untracked, or the job's run exists already
    mlflow_client.require()
    parent = parent_run(cfg, Path(sweep_dir))
    uri = parent["uri"] if parent else mlflow_client.store_uri(cfg["tracking"]["uri"])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    link = {"backend": "mlflow", "uri": uri, "run_id": None, "name": name}
    atomic_write_json(RunDir(run_dir).tracking, {**link, "parent_run_id": parent["run_id"] if parent else None})


def parent_run(cfg: dict, sweep_dir: Path) -> dict | None:
    """The sweep's parent run record, created by the first job; None when the tracker failed (warned)."""
    sweep = SweepDir(sweep_dir)
    sweep.path.mkdir(parents=True, exist_ok=True)
    with open(sweep.tracking_lock, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        kept = kept_record(sweep.tracking_parent)
        if kept:
            return kept
        tracker = Tracker(mlflow_client.store_uri(cfg["tracking"]["uri"]), cfg, sweep.path)
        tracker.client = tracker.guard("connect", lambda: mlflow_client.connect(tracker.uri))
        name = f"sweep {sweep.path.parent.name}/{sweep.path.name}"
        made = tracker.guard("create the sweep's parent run", lambda: new_run(tracker, name, parent_id=None, params={}))
        if made is None:
            return None
        record = {"backend": "mlflow", "uri": tracker.uri, "experiment_id": made[0], "run_id": made[1]}
        atomic_write_json(sweep.tracking_parent, record)
        return record


def finish_sweep(sweep_dir: Path) -> Path | None:
    """At the sweep's end: its comparison page (path printed), then the parent run's end with the page."""
    from server.tracking.compare import CompareError, compare

    sweep = SweepDir(Path(sweep_dir).resolve())
    page = None
    try:
        found = compare([sweep.path], sweep.comparison)
        page = found.page
        print(f"fedpriv: comparison of the sweep's {len(found.runs)} runs: {page}")
    except CompareError as err:
        print(f"fedpriv: no comparison page for the sweep: {err}")
    sweep.tracking_lock.unlink(missing_ok=True)  # every job has linked its run
    parent = kept_record(sweep.tracking_parent)
    if parent and parent.get("run_id"):
        tracker = continued_parent(sweep, parent)
        if page is not None:
            tracker.store_files("the comparison page", [page], "comparison")
        tracker.end("FINISHED")
    return page


def continued_parent(sweep: SweepDir, parent: dict) -> Tracker:
    tracker = Tracker(parent["uri"], {}, sweep.path, run_id=parent["run_id"])
    tracker.client = tracker.guard("connect", lambda: mlflow_client.connect(tracker.uri))
    return tracker
