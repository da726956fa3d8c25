"""The runs ``fedpriv compare`` reads, and what they differ in.

Only what the run directories hold is read — the stored config (``RunDir.config``),
``privacy_report.json`` and ``metrics.jsonl`` — and nothing is re-rendered: the figures are the
reports' own. What the runs differ in is found from their resolved configs. Runs of different
data or test sets are refused (their accuracies measure different things); a run without a
report (unfinished, or failed) is left out and said.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.report import read_metrics
from common.rundir import RunDir, SweepDir

#: Settings that differ between any two runs without making them different experiments.
IGNORED = ("state_dir", "resume")


class CompareError(ValueError):
    """The directories cannot be compared; the message says why."""


@dataclass(frozen=True)
class Epsilon:
    """The highest client's ε of a run at its δ: sample level, or client level where that is the run's only level."""

    value: float
    delta: float | None
    level: str  # "sample" | "client"
    client_id: str | None = None

    def text(self) -> str:
        delta = f"δ={self.delta:g}" if self.delta is not None else "δ unknown"
        return f"{self.value:.3f} ({delta}{', client level' if self.level == 'client' else ''})"


@dataclass
class Run:
    label: str
    run_dir: RunDir
    config: dict
    report: dict
    records: list[dict]  # metrics.jsonl: the rounds' wall time

    def last(self, key: str) -> float | None:
        rounds = self.report.get("rounds") or []
        return rounds[-1].get(key) if rounds else None

    @property
    def epsilon(self) -> Epsilon | None:
        return highest_epsilon(self.report)

    @property
    def wall_s(self) -> float:
        return sum(float(r.get("wall_s") or 0.0) for r in self.records)


def highest_epsilon(report: dict) -> Epsilon | None:
    """The report's highest client ε at its δ; None without differential privacy."""
    sample, level = report["sample_level"], report["client_level"]
    if sample.get("enabled") and sample.get("clients"):
        top = max(sample["clients"], key=lambda c: c["epsilon"])
        return Epsilon(float(top["epsilon"]), sample.get("delta"), "sample", str(top["client_id"]))
    if level.get("enabled") and level.get("epsilon") is not None:
        return Epsilon(float(level["epsilon"]), level.get("delta"), "client")
    return None


@dataclass
class Comparison:
    runs: list[Run]
    keys: list[str]  # the settings whose values differ between the runs
    skipped: list[str] = field(default_factory=list)
    page: Path | None = None

    def setting(self, run: Run, key: str) -> str:
        return show(flat(run.config).get(key, MISSING))

    def headers(self) -> list[str]:
        return ["run", *self.keys, "accuracy", "macro F1", "highest client ε", "rounds", "declines", "wall time"]

    def rows(self) -> list[list[str]]:
        out = []
        for run in self.runs:
            eps = run.epsilon
            rounds = f"{len(run.report.get('rounds') or [])} of {run.config['rounds']}"
            declines = sum(int(r.get("clients_declined") or 0) for r in run.report.get("rounds") or [])
            out.append(
                [
                    run.label,
                    *(self.setting(run, key) for key in self.keys),
                    number(run.last("accuracy")),
                    number(run.last("macro_f1")),
                    eps.text() if eps else "no DP",
                    rounds,
                    str(declines),
                    duration(run.wall_s),
                ]
            )
        return out

    def table(self):
        """The rows as a rich table for the terminal."""
        from rich.table import Table

        table = Table(title=f"fedpriv compare: {len(self.runs)} runs", title_justify="left")
        for i, header in enumerate(self.headers()):
            table.add_column(header, style="bold" if i == 0 else None, overflow="fold")
        for row in self.rows():
            table.add_row(*row)
        return table


MISSING = object()  # a setting one run's config does not have


def show(value) -> str:
    if value is MISSING:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def number(value: float | None) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f} s"


def collect(dirs: list[Path]) -> tuple[list[Run], list[str]]:
    """(the finished runs under ``dirs``, one note per run left out), in the order given."""
    found: list[RunDir] = []
    for d in dirs:
        if not d.is_dir():
            raise CompareError(f"{d}: no such directory")
        jobs = [RunDir(d)] if RunDir(d).is_run() else SweepDir(d).jobs()
        if not jobs:
            raise CompareError(f"{d}: neither a run directory (.hydra/config.yaml) nor a multirun directory of runs")
        found += [job for job in jobs if job.path.resolve() not in {f.path.resolve() for f in found}]
    labels = _labels([run.path for run in found])
    runs, skipped = [], []
    for run, label in zip(found, labels):
        if not run.report_json.is_file():
            skipped.append(f"{label}: no privacy_report.json (unfinished or failed); left out")
            continue
        report = json.loads(run.report_json.read_text())
        runs.append(Run(label, run, run.config(), report, read_metrics(run.path, missing_ok=True)))
    return runs, skipped


def _labels(paths: list[Path]) -> list[str]:
    """Each run's path below what they share (a sweep's jobs: 0, 1, ...), or its name alone."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    return [str(p.relative_to(common)) or p.name for p in resolved]


def flat(cfg: Mapping, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a config down to its values (lists are values)."""
    out: dict[str, object] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing(configs: list[dict], ignored: tuple[str, ...] = IGNORED) -> list[str]:
    """The dotted settings whose values are not the same in every config, in config order."""
    flats = [flat(cfg) for cfg in configs]
    keys = list(dict.fromkeys(key for f in flats for key in f))
    return [
        key for key in keys if key.split(".")[0] not in ignored and len({show(f.get(key, MISSING)) for f in flats}) > 1
    ]


def data_identity(cfg: dict) -> dict:
    """What fixes a run's training and test data: the data group, the task, and the seed where
    it draws them (the synthetic set, or a test split cut off by ``data.test_fraction``)."""
    data = {k: v for k, v in cfg["data"].items() if k != "labels"}
    by_seed = data.get("source") == "synthetic" or ("test_path" in data and data["test_path"] is None)
    return {"task": cfg["task"], "data": data, **({"seed": cfg["seed"]} if by_seed else {})}


def same_data(runs: list[Run]) -> None:
    """Refuse runs whose data or test sets differ, naming the settings that differ."""
    keys = differing([data_identity(run.config) for run in runs], ignored=())
    if keys:
        first = keys[0]
        values = ", ".join(f"{run.label}: {show(flat(data_identity(run.config)).get(first, MISSING))}" for run in runs)
        raise CompareError(
            f"the runs use different data or test sets ({', '.join(keys)} differ; {first} is {values}): "
            "their accuracies are not comparable; compare the runs of each data set separately"
        )
    sizes = {run.label: (run.report.get("evaluation") or {}).get("num_examples") for run in runs}
    if len({size for size in sizes.values() if size is not None}) > 1:
        raise CompareError(
            f"the runs were evaluated on test sets of different sizes ({sizes}): their accuracies are not comparable"
        )
