"""``tracking=mlflow``: one MLflow run per fedpriv run, fed from what the report releases.

What goes to the tracker: the resolved config as params (the report holds it), per round the
report's figures (``accuracy``, ``loss``, ``macro_f1``, ``weighted_f1``, ``micro_f1`` for tagged
words, ``clients_trained``, ``clients_declined``, ``clients_rejected``) and the report's ε as it
stands after the round (``epsilon_max``, ``epsilon_min``: the highest and lowest client's
sample-level ε, or the client-level ε where that is the run's only level;
``epsilon_client_level``), at the end the report files and their plots. Nothing else: no client
ids, no decline reasons, no per-client figure the report does not show.

The run's MLflow run id is kept in the run directory (``RunDir.tracking``): a resumed run
continues it and first logs the rounds it lacks, so the series has no gap and no repeat. A
tracker that is down or refuses a write costs one warning; the run goes on untracked and its
run directory stays the record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from common.report import ACCURACY_PLOT, CONFUSION_PLOT, EPSILON_PLOT, read_metrics, round_epsilons
from common.rundir import RunDir
from common.storage import atomic_write_json
from server.tracking import mlflow_client

log = logging.getLogger(__name__)

#: A round's metrics from its ``metrics.jsonl`` record, as the report's ``rounds`` name them;
#: ``accuracy`` is logged last, so that a round with an ``accuracy`` step has all of them.
RECORD_METRICS = (
    "loss",
    "macro_f1",
    "weighted_f1",
    "micro_f1",
    "clients_trained",
    "clients_declined",
    "clients_rejected",
)
EPSILON_METRICS = ("epsilon_max", "epsilon_min", "epsilon_client_level")
ARTIFACT_FOLDER = "report"  # the report's files; its plots under report/plots, as the HTML links them


def round_metrics(record: dict, epsilons: dict) -> list[tuple[str, float]]:
    """(name, value) of one round, ``accuracy`` last; a figure the run lacks is left out."""
    figures = dict(epsilons)
    if "epsilon_max" not in figures and "epsilon_client_level" in figures:  # client-level DP only
        figures["epsilon_max"] = figures["epsilon_min"] = figures["epsilon_client_level"]
    found = [(key, record.get(key)) for key in RECORD_METRICS] + [(key, figures.get(key)) for key in EPSILON_METRICS]
    found.append(("accuracy", record.get("accuracy")))
    return [(key, float(value)) for key, value in found if isinstance(value, (int, float))]


@dataclass
class Tracker:
    """One fedpriv run's MLflow run. After the first failure every call is skipped."""

    uri: str
    cfg: dict
    run_dir: Path
    run_id: str | None = None
    broken: bool = False
    client: object = field(default=None, repr=False)

    def guard(self, what: str, action):
        """``action()``, or None once MLflow has failed: the first failure is the one warning."""
        if self.broken:
            return None
        try:
            return action()
        except Exception as err:
            self.fail(what, err)
            return None

    def fail(self, what: str, err: BaseException) -> None:
        """The one warning; every later call is skipped."""
        self.broken = True
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        log.warning(
            "tracking: MLflow at %s failed to %s (%s); the run goes on untracked, its run directory is the record",
            self.uri,
            what,
            reason,
        )

    def round(self, record: dict, epsilons: dict) -> None:
        """The loop's observer (``server.round.loop.RoundObserver``): log one completed round."""
        self.guard(f"log round {record['round']}", lambda: self._log_round(record, epsilons))

    def _log_round(self, record: dict, epsilons: dict) -> None:
        mlflow_client.log_metrics(self.client, self.run_id, int(record["round"]), round_metrics(record, epsilons))

    def catch_up(self) -> None:
        """Log the completed rounds the MLflow run lacks (a resumed run's, or those lost to an outage)."""
        self.guard("catch up on the completed rounds", self._catch_up)

    def _catch_up(self) -> None:
        run = RunDir(self.run_dir)
        logged = mlflow_client.logged_steps(self.client, self.run_id, "accuracy")
        missing = [r for r in read_metrics(self.run_dir, missing_ok=True) if r["round"] not in logged]
        if not missing:
            return
        reported = json.loads(run.clients_reported.read_text()) if run.clients_reported.exists() else {}
        level = json.loads(run.client_level.read_text()) if run.client_level.exists() else None
        for record in missing:
            self._log_round(record, round_epsilons(self.cfg, reported, level, record["round"]))
        log.info("tracking: logged %d completed round(s) the MLflow run lacked", len(missing))

    def finish(self) -> None:
        """The report's files and plots as artifacts, then the run's end."""
        self.guard("store the report", self._store_report)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """``FINISHED`` or ``FAILED``; a resumed run's open sets it ``RUNNING`` again."""
        self.guard("end the run", lambda: mlflow_client.set_status(self.client, self.run_id, status))

    def _store_report(self) -> None:
        run = RunDir(self.run_dir)
        files = [p for p in (run.report_json, run.report_md, run.report_html) if p.is_file()]
        mlflow_client.log_files(self.client, self.run_id, files, ARTIFACT_FOLDER)
        plots = [run.path / name for name in (EPSILON_PLOT, ACCURACY_PLOT, CONFUSION_PLOT)]
        mlflow_client.log_files(self.client, self.run_id, [p for p in plots if p.is_file()], f"{ARTIFACT_FOLDER}/plots")

    def store_files(self, what: str, files: list[Path], folder: str) -> None:
        """More files as artifacts: ``fedpriv export``'s model card, a sweep's comparison page."""
        present = [p for p in files if p.is_file()]
        if present:
            self.guard(f"store {what}", lambda: mlflow_client.log_files(self.client, self.run_id, present, folder))


def open_tracker(cfg: dict, run_dir: Path, *, name: str | None = None):
    """The run's tracker: None with ``tracking=none``; else its MLflow run, continued when the run
    directory keeps its id (``RunDir.tracking``), created otherwise (nested under the parent run
    the kept record names: a sweep's, ``server.tracking.sweep.link_job``).

    A missing client is a ConfigError (``tracking``); a tracker that fails gives a broken
    Tracker whose calls are skipped, after one warning."""
    if cfg["tracking"]["name"] == "none":
        return None
    mlflow_client.require()
    kept = kept_record(RunDir(run_dir).tracking) or {}
    tracker = Tracker(kept.get("uri") or mlflow_client.store_uri(cfg["tracking"]["uri"]), cfg, Path(run_dir))
    tracker.client = tracker.guard("connect", lambda: mlflow_client.connect(tracker.uri))
    if kept.get("run_id"):
        tracker.run_id = kept["run_id"]
        tracker.guard("continue the run", lambda: mlflow_client.set_status(tracker.client, tracker.run_id, "RUNNING"))
        return tracker
    parent = kept.get("parent_run_id")
    run_name = name or kept.get("name") or Path(run_dir).name

    def create() -> str:
        experiment, run_id = new_run(tracker, run_name, parent_id=parent, params=mlflow_client.flat_params(cfg))
        record = {"backend": "mlflow", "uri": tracker.uri, "experiment_id": experiment, "run_id": run_id}
        atomic_write_json(RunDir(run_dir).tracking, {**record, "parent_run_id": parent, "name": run_name})
        return run_id

    tracker.run_id = tracker.guard("create the run", create)
    return tracker


def new_run(tracker: Tracker, name: str, *, parent_id: str | None, params: dict[str, str]) -> tuple[str, str]:
    """(experiment id, run id) of a new MLflow run in ``tracking.experiment``, with ``params``."""
    experiment = mlflow_client.experiment_id(tracker.client, tracker.cfg["tracking"]["experiment"])
    tags = {"fedpriv.dir": str(tracker.run_dir.resolve())}
    run_id = mlflow_client.create_run(tracker.client, experiment, name=name, parent_id=parent_id, tags=tags)
    mlflow_client.log_params(tracker.client, run_id, params)
    return experiment, run_id


def kept_record(path: Path) -> dict | None:
    """A kept tracking record (``RunDir.tracking``, ``SweepDir.tracking_parent``), or None."""
    return json.loads(path.read_text()) if path.is_file() else None


def continued(run_dir: Path) -> Tracker | None:
    """The tracker of a run that kept an MLflow run (for ``fedpriv export``), or None; never raises."""
    kept = kept_record(RunDir(run_dir).tracking)
    if not kept or not kept.get("run_id"):
        return None
    tracker = Tracker(kept["uri"], {}, Path(run_dir), run_id=kept["run_id"])
    try:
        mlflow_client.require()
    except Exception as err:
        tracker.fail("load its client", err)
        return tracker
    tracker.client = tracker.guard("connect", lambda: mlflow_client.connect(tracker.uri))
    return tracker


def store_export(run_dir: Path, out: Path) -> None:
    """After ``fedpriv export``: its model card and provenance file into the run's MLflow run, if it kept one."""
    from server.release.export import EXPORT_META
    from server.release.model_card import CARD_FILE

    tracker = continued(Path(run_dir))
    if tracker is not None:
        tracker.store_files("the model card", [Path(out) / CARD_FILE, Path(out) / EXPORT_META], "model_card")
