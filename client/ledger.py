"""The client's own privacy ledger: its cumulative Opacus history, on disk.

One JSON file per client, ``<state_dir>/<client_id>/ledger.json``, that survives
rounds, runs and process restarts. It is the only source of the client's prior
spend; ε is always recomputed from its ``history`` (common.accounting).

Write-ahead: a trained round's entry (and the reply it produced) is committed with
an atomic rename and fsync *before* the update leaves the client, so a crash can
only over-count spend, never under-count it. The history only ever grows.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.accounting import normalise
from common.storage import atomic_write_bytes

LEDGER_FILE = "ledger.json"
REPLY_FILE = "last_reply.pt"
LEDGER_VERSION = 1


@dataclass
class RoundEntry:
    """What happened to this client in one round of one run."""

    run_id: str
    round: int
    status: str  # "trained" | "declined"
    epsilon: float | None  # cumulative ε after this round; None without DP
    reason: str = ""
    reply_key: str = ""  # identifies the kept reply of a trained round


@dataclass
class RunCalibration:
    """σ fixed once per run (a resumed run reuses it) and the sampling it assumed."""

    noise_multiplier: float | None  # None: the budget was already spent at calibration
    sample_rate: float
    steps_per_round: int
    planned_steps: int


@dataclass
class Ledger:
    client_id: str
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[RoundEntry] = field(default_factory=list)
    runs: dict[str, RunCalibration] = field(default_factory=dict)

    # --- persistence -------------------------------------------------------------

    @staticmethod
    def directory(state_dir: str | Path, client_id: str) -> Path:
        return Path(state_dir) / str(client_id)

    @classmethod
    def load(cls, state_dir: str | Path, client_id: str) -> "Ledger":
        """The client's ledger, or an empty one if it never trained here."""
        path = cls.directory(state_dir, client_id) / LEDGER_FILE
        if not path.exists():
            return cls(client_id=str(client_id))
        raw = json.loads(path.read_text())
        if raw.get("version") != LEDGER_VERSION or str(raw.get("client_id")) != str(client_id):
            raise ValueError(f"{path}: not a version-{LEDGER_VERSION} ledger of client {client_id}")
        return cls(
            client_id=str(raw["client_id"]),
            history=normalise(raw["history"]),
            rounds=[RoundEntry(**r) for r in raw["rounds"]],
            runs={k: RunCalibration(**v) for k, v in raw["runs"].items()},
        )

    def commit(self, state_dir: str | Path, previous: "Ledger | None" = None) -> None:
        """Durably replace the ledger file. Refuses to shrink the history."""
        if previous is not None and not _extends(self.history, previous.history):
            raise RuntimeError("refusing to commit a ledger whose history does not extend the stored one")
        payload = {
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "history": [list(h) for h in self.history],
            "rounds": [asdict(r) for r in self.rounds],
            "runs": {k: asdict(v) for k, v in self.runs.items()},
        }
        path = self.directory(state_dir, self.client_id) / LEDGER_FILE
        atomic_write_bytes(path, json.dumps(payload, indent=1).encode())

    # --- queries -------------------------------------------------------------------

    def entry(self, run_id: str, server_round: int) -> RoundEntry | None:
        for entry in self.rounds:
            if entry.run_id == run_id and entry.round == server_round:
                return entry
        return None

    def run_entries(self, run_id: str) -> list[RoundEntry]:
        return [e for e in self.rounds if e.run_id == run_id]


def _extends(new: list, old: list) -> bool:
    """True when ``new`` is ``old`` plus more steps (Opacus may merge into the last entry)."""
    if len(new) < len(old):
        return False
    for i, (a, b) in enumerate(zip(new, old)):
        last = i == len(old) - 1
        if a[:2] != b[:2] or (a[2] < b[2] if last else a[2] != b[2]):
            return False
    return True


# --- the kept reply ----------------------------------------------------------------


def reply_key(run_id: str, server_round: int, global_digest: str) -> str:
    return f"{run_id}:{server_round}:{global_digest}"


def save_reply(state_dir: str | Path, client_id: str, key: str, reply: dict[str, Any]) -> None:
    """Keep the reply so that a repeated request gets it again without new spend."""
    buf = io.BytesIO()
    torch.save({"key": key, "reply": reply}, buf)
    atomic_write_bytes(Ledger.directory(state_dir, client_id) / REPLY_FILE, buf.getvalue())


def load_reply(state_dir: str | Path, client_id: str, key: str) -> dict[str, Any] | None:
    path = Ledger.directory(state_dir, client_id) / REPLY_FILE
    if not path.exists():
        return None
    kept = torch.load(path, weights_only=True)
    return kept["reply"] if kept.get("key") == key else None
