"""A run directory's files, each named once (DESIGN.md "Run directory").

The round loop writes them, ``fedpriv report``/``export``/``predict``/``explain`` and the
benchmarks read them: every one of them reaches a file through :class:`RunDir`, so no file
name is spelled twice. A stored config is read only through :meth:`RunDir.config`, which
brings an older run's config up to date (``common.config.upgrade``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # What the run is: its resolved config (Hydra's file, rewritten resolved by the loop).
    @property
    def config_file(self) -> Path:
        return self.path / ".hydra" / "config.yaml"

    # The round loop's records, in the order a round writes them.
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def clients_reported(self) -> Path:
        return self.path / "clients_reported.json"

    @property
    def client_level(self) -> Path:
        return self.path / "client_level.json"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.json"

    @property
    def client_evaluation(self) -> Path:
        """Simulation: the simulated devices' own per-client figures, read from their state
        directories at the run's end (``server.round.devices``); absent in deployment."""
        return self.path / "client_evaluation.json"

    @property
    def metrics(self) -> Path:
        """One line per completed round, appended last (its reader: ``common.report.read_metrics``)."""
        return self.path / "metrics.jsonl"

    # What a finished run shows.
    @property
    def report_json(self) -> Path:
        return self.path / "privacy_report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "privacy_report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "privacy_report.html"

    @property
    def explain_page(self) -> Path:
        return self.path / "explain_test_set.html"

    @property
    def audit(self) -> Path:
        return self.path / "audit.json"

    @property
    def cli_log(self) -> Path:
        return self.path / "cli.log"

    @property
    def tracking(self) -> Path:
        """The tracker's run id (``tracking=mlflow``), so that a resumed run continues that run."""
        return self.path / "tracking.json"

    def is_run(self) -> bool:
        """Whether this is a fedpriv run directory (it holds a stored config)."""
        return self.config_file.is_file()

    def config(self) -> dict:
        """The run's stored config, resolved and brought up to date (``common.config.upgrade``)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from common.config.upgrade import upgrade

        stored = OmegaConf.load(self.config_file)
        try:
            return upgrade(OmegaConf.to_container(stored, resolve=True))
        except OmegaConfBaseException:  # Hydra's own interpolations, in a run cut short before the loop resolved them
            return upgrade(OmegaConf.to_container(stored, resolve=False))


@dataclass(frozen=True)
class SweepDir:
    """A Hydra multirun directory (``fedpriv simulate -m``): one run directory per job."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def comparison(self) -> Path:
        """``fedpriv compare``'s page of the sweep, written when the sweep ends."""
        return self.path / "comparison.html"

    @property
    def tracking_parent(self) -> Path:
        """The tracker's parent run of the sweep, created by the first job that needs it."""
        return self.path / "tracking_parent.json"

    @property
    def tracking_lock(self) -> Path:
        return self.path / "tracking_parent.lock"

    def jobs(self) -> list[RunDir]:
        """Its jobs' run directories, in job order (Hydra names them 0, 1, ... 10)."""
        found = [RunDir(p) for p in self.path.iterdir() if p.is_dir() and RunDir(p).is_run()]
        return sorted(found, key=lambda run: _job_order(run.path.name))


def _job_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
