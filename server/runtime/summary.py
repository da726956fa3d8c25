"""What a finished run says on the terminal: a short table, and whether the run trained at all.

Everything is read back from the run directory (``privacy_report.json``, ``metrics.jsonl``),
so the summary states what was written, whoever wrote it (a fresh run, a resumed one, a sweep
job). A run in which no client's update was accepted in any round released the untrained
model: when clients only declined (their budgets were spent) that is the privacy ledger doing
its job; when they failed, were rejected or never answered, the run failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.report.rundir import read_metrics
from common.rundir import RunDir

#: How a failure reads in ``metrics.jsonl``: Flower's error code, then its reason
#: ``str(type(ex)) + ":<'" + str(ex) + "'>"``, cut at 300 characters (server.round.aggregate). The
#: text between the quotes is the device's fixed public reason (client.app.public_reason).
_FLOWER_ERROR = re.compile(r"^(?:\d+: )?<class '[\w.]+'>:<'(?P<text>.*?)(?:'>)?$", re.DOTALL)


def every_client_failed(record: dict) -> bool:
    """A round whose sampled clients all errored or never answered: none trained, declined or
    was rejected."""
    answered = record["clients_trained"] + record["clients_declined"] + record["clients_rejected"]
    return answered == 0 and record["clients_failed"] + record.get("clients_missing", 0) > 0


def first_client_error(records: list[dict]) -> str | None:
    """The first failure of the run on one line: who, and the public reason it sent."""
    for record in records:
        for who, reason in sorted(record.get("failed", {}).items()):
            found = _FLOWER_ERROR.match(reason)
            text = found["text"] if found else reason
            return f"round {record['round']}, {who}: {' '.join(text.split())}"
        for who, reason in sorted(record.get("rejected", {}).items()):
            return f"round {record['round']}, {who}'s update was rejected: {' '.join(str(reason).split())}"
        if record.get("clients_missing"):
            return f"round {record['round']}: {record['clients_missing']} sampled client(s) sent no reply in time"
    return None


@dataclass
class RunSummary:
    """The figures of the terminal's last table, read from one run directory."""

    run_dir: Path
    rounds_planned: int
    records: list[dict]
    clients: list[dict]  # the report's sample-level rows (ε, budget), empty without sample-level DP
    client_level: dict | None  # the report's client-level block when enabled
    evaluation: dict | None = None  # the report's evaluation block (its per-client figures, when asked)
    failed_rounds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.failed_rounds = [r["round"] for r in self.records if every_client_failed(r)]

    @classmethod
    def of(cls, run_dir: Path) -> "RunSummary":
        report = json.loads(RunDir(run_dir).report_json.read_text())
        sample, level = report["sample_level"], report["client_level"]
        return cls(
            Path(run_dir),
            int(report["config"]["rounds"]),
            read_metrics(run_dir, missing_ok=True),
            list(sample["clients"]) if sample.get("enabled") else [],
            level if level.get("enabled") else None,
            report.get("evaluation"),
        )

    @property
    def trained_nothing(self) -> bool:
        return bool(self.records) and not any(r["clients_trained"] for r in self.records)

    @property
    def only_declined(self) -> bool:
        """No update accepted, and every client that was asked declined."""
        return self.trained_nothing and all(
            r["clients_declined"] > 0 and r["clients_failed"] + r["clients_rejected"] + r.get("clients_missing", 0) == 0
            for r in self.records
        )

    def failure(self) -> str | None:
        """The one-line reason the run failed, or None: nothing trained, not because of declines."""
        if not self.trained_nothing or self.only_declined:
            return None
        error = first_client_error(self.records) or "no client's update was accepted"
        return f"fedpriv: no client trained in any round; first client error: {error}"

    def note(self) -> str | None:
        """What a run that succeeded without training must say (every client declined)."""
        if self.only_declined:
            return (
                "fedpriv: every client declined in every round (privacy budget spent); "
                "the released model is the untrained one"
            )
        return None

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the table, in order."""
        done = len(self.records)
        rounds = f"{done} of {self.rounds_planned}"
        if self.failed_rounds:
            rounds += f" (every client failed in round {', '.join(map(str, self.failed_rounds))})"
        rows = [("rounds", rounds)]
        if self.records:
            rows.append(("final accuracy", f"{self.records[-1]['accuracy']:.3f}"))
            if self.records[-1].get("micro_f1") is not None:  # token classification: what the field reports
                rows.append(("final entity F1", f"{self.records[-1]['micro_f1']:.3f} (micro)"))
        if self.clients:
            high = max(self.clients, key=lambda c: c["epsilon"])
            low = min(self.clients, key=lambda c: c["epsilon"])
            rows.append(("highest client ε", _spent(high)))
            rows.append(("lowest client ε", _spent(low)))
            local = [c["epsilon_local"] for c in self.clients if c.get("epsilon_local") is not None]
            if local:  # distributed noise: the ε above trusts SecAgg+ and n_min shares; this trusts no one
                rows.append(("highest ε of a client's own messages (epsilon_local)", f"{max(local):.3f}"))
        if self.client_level is not None and self.client_level.get("epsilon") is not None:
            rows.append(("client-level ε", f"{self.client_level['epsilon']:.3f}"))
        rows += self.per_client_rows()
        rows.append(("declines", str(sum(r["clients_declined"] for r in self.records))))
        rows.append(("rejections", str(sum(r["clients_rejected"] for r in self.records))))
        rows.append(("report", str(RunDir(self.run_dir).report_md)))
        return rows

    def per_client_rows(self) -> list[tuple[str, str]]:
        """Per-client accuracy on the clients' own held-out parts (mean, 10th percentile, worst), global
        and personal, when the run asked for it (the report's ``evaluation.per_client_summary``)."""
        summary = (self.evaluation or {}).get("per_client_summary")
        if summary is None:
            return []
        if not summary.get("clients"):
            return [("per-client accuracy", "kept on the devices (not released)")]
        rows = []
        for label, key in (("per-client global", "global"), ("per-client personal", "personal")):
            stats = summary.get(key)
            if stats:
                rows.append((label, f"mean {stats['mean']:.3f}, p10 {stats['p10']:.3f}, worst {stats['worst']:.3f}"))
        return rows

    def table(self):
        """The rows as a rich table (two columns, no header)."""
        from rich.table import Table

        table = Table(title="fedpriv run", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, value in self.rows():
            table.add_row(label, value)
        return table


def _spent(client: dict) -> str:
    budget = client.get("budget_epsilon")
    of = f" of {budget:.3f}" if budget is not None else ""
    return f"{client['epsilon']:.3f}{of} (client {client['client_id']})"
