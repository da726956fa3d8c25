"""The client's own privacy ledger: its cumulative Opacus history, on disk.

One JSON file per client, ``<state_dir>/<client_id>/ledger.json``, that survives
rounds, runs and process restarts. It is the only source of the client's prior
spend; ε is always recomputed from its ``history`` (common.privacy.accounting).

Write-ahead: a trained round's entry (and the reply it produced) is committed with
an atomic rename and fsync *before* the update leaves the client, so a crash can
only over-count spend, never under-count it. The history only ever grows.

One round at a time: :func:`locked` holds an OS lock (``flock``) on the client's state
directory from loading the ledger to committing it, so two rounds that overlap on one
state directory (two runs sharing ``state_dir``, or a SuperNode handing over the next
message while one still trains, in another process or thread) run one after the
other, and the second sees the first's spend. :meth:`Ledger.commit` also re-reads the
file under that lock and refuses a history that does not extend it.

One δ and one accountant per ledger: the first spend pins them, and "ε never goes
down" holds at that δ. A later round with another δ or accountant is refused before
training (:meth:`Ledger.check_pins`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.privacy.accounting import check_pins, normalise
from common.privacy.discrete import SkellamEntry
from common.storage import atomic_write_bytes

LEDGER_FILE = "ledger.json"
REPLY_FILE = "last_reply.pt"  # before replies were kept per run; still read
KEPT_RUNS = 4  # runs whose last reply a client keeps (two runs may share one state_dir)
LOCK_FILE = ".lock"
LEDGER_VERSION = 1


class LedgerBusy(RuntimeError):
    """Another round holds this client's state directory for longer than we may wait."""


@contextlib.contextmanager
def locked(
    state_dir: str | Path, client_id: str, *, timeout: float = 600.0, lock_file: str = LOCK_FILE
) -> Iterator[None]:
    """Hold the client's state-directory lock (``flock``, exclusive) for the block.

    ``flock`` locks belong to an open file description, so two processes, and two
    threads that each open the lock file, exclude each other; the OS drops the lock
    if the holder dies. Waits at most ``timeout`` seconds, then raises LedgerBusy.
    ``lock_file``: another lock in the same directory (the transparency log has its own,
    so that logging a decline never waits for a round that holds the ledger).
    """
    directory = Ledger.directory(state_dir, client_id)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerBusy("the client's state directory is held by another round") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class RoundEntry:
    """What happened to this client in one round of one run."""

    run_id: str
    round: int
    status: str  # "trained" | "declined"
    epsilon: float | None  # cumulative ε after this round; None without DP
    reason: str = ""
    reply_key: str = ""  # identifies the kept reply of a trained round
    steps: int | None = None  # the history's cumulative steps after a trained round (None: older ledgers)
    releases: int | None = None  # distributed noise: the discrete releases so far after this round
    epsilon_local: float | None = None  # distributed noise: ε of this client's own messages alone, after it


@dataclass
class RunCalibration:
    """σ fixed once per run (a resumed run reuses it) and the sampling it assumed."""

    noise_multiplier: float | None  # None: the budget was already spent at calibration
    sample_rate: float
    steps_per_round: int
    planned_steps: int  # DP-SGD steps of the whole run (head and encoder rounds)
    prototype_noise: float | None = None  # σ of the run's prototype release (recipe.prototypes), if any


@dataclass
class Ledger:
    client_id: str
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[RoundEntry] = field(default_factory=list)
    runs: dict[str, RunCalibration] = field(default_factory=dict)
    delta: float | None = None  # pinned by the first spend: every ε of this ledger is at this δ
    accountant: str | None = None  # pinned with δ: "rdp" | "prv"
    # Distributed-noise releases (common.privacy.discrete), composed with ``history`` for ε.
    discrete: list[SkellamEntry] = field(default_factory=list)

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
            delta=raw.get("delta"),
            accountant=raw.get("accountant"),
            discrete=[SkellamEntry.from_json(e) for e in raw.get("discrete", [])],
        )

    def commit(self, state_dir: str | Path, previous: "Ledger | None" = None) -> None:
        """Durably replace the ledger file. Refuses to shrink the history or change its pins.

        The check is against the file as it is now (re-read here; callers hold
        :func:`locked`), and against ``previous`` when given, so a ledger loaded before
        another round committed can never overwrite that round's spend.
        """
        stored = Ledger.load(state_dir, self.client_id)
        for old in (stored, previous):
            if old is None:
                continue
            if not _extends(self.history, old.history):
                raise RuntimeError("refusing to commit a ledger whose history does not extend the stored one")
            if not _extends_discrete(self.discrete, old.discrete):
                raise RuntimeError("refusing to commit a ledger whose discrete releases do not extend the stored ones")
            if (
                (old.history or old.discrete)
                and (old.delta, old.accountant) != (self.delta, self.accountant)
                and old.delta is not None
            ):
                raise RuntimeError("refusing to commit a ledger whose delta or accountant differs from the stored one")
        payload = {
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(h) for h in self.history],
            "rounds": [_round_json(r) for r in self.rounds],
            "runs": {k: asdict(v) for k, v in self.runs.items()},
        }
        if self.discrete:  # a ledger without distributed-noise releases is written as before
            payload["discrete"] = [e.to_json() for e in self.discrete]
        path = self.directory(state_dir, self.client_id) / LEDGER_FILE
        atomic_write_bytes(path, json.dumps(payload, indent=1).encode())

    def check_pins(self, delta: float, accountant: str) -> None:
        """Refuse a round at another δ or accountant than this ledger's spend (``accounting.check_pins``)."""
        if self.history or self.discrete:
            check_pins(self.delta, self.accountant, delta, accountant)

    def pin(self, delta: float, accountant: str) -> None:
        """Fix δ and the accountant with the ledger's first spend (a legacy ledger gets them now)."""
        self.check_pins(delta, accountant)
        if self.delta is None:
            self.delta, self.accountant = float(delta), str(accountant)

    # --- queries -------------------------------------------------------------------

    def entry(self, run_id: str, server_round: int) -> RoundEntry | None:
        for entry in self.rounds:
            if entry.run_id == run_id and entry.round == server_round:
                return entry
        return None

    def run_entries(self, run_id: str) -> list[RoundEntry]:
        return [e for e in self.rounds if e.run_id == run_id]


def _round_json(entry: RoundEntry) -> dict:
    """A round entry as stored; the distributed-noise fields only where they are set."""
    raw = asdict(entry)
    for key in ("releases", "epsilon_local"):
        if raw[key] is None:
            del raw[key]
    return raw


def _extends_discrete(new: list[SkellamEntry], old: list[SkellamEntry]) -> bool:
    """True when ``new`` is ``old`` plus more releases (merged into the last entry, or appended)."""
    if len(new) < len(old):
        return False
    for i, (a, b) in enumerate(zip(new, old)):
        last = i == len(old) - 1
        if not a.same_mechanism(b) or (a.steps < b.steps if last else a.steps != b.steps):
            return False
    return True


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


def _reply_path(state_dir: str | Path, client_id: str, key: str) -> Path:
    """One kept reply per run, so two runs sharing a state_dir can each resend theirs."""
    run_id = key.split(":", 1)[0]
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    return Ledger.directory(state_dir, client_id) / f"last_reply-{digest}.pt"


def save_reply(state_dir: str | Path, client_id: str, key: str, reply: dict[str, Any]) -> None:
    """Keep the reply so that a repeated request gets it again without new spend.

    Only the :data:`KEPT_RUNS` most recent runs' replies are kept: a run whose reply was
    pruned declines a repeated request ("already-trained") rather than train twice.
    """
    buf = io.BytesIO()
    torch.save({"key": key, "reply": reply}, buf)
    path = _reply_path(state_dir, client_id, key)
    atomic_write_bytes(path, buf.getvalue())
    kept = sorted(path.parent.glob("last_reply-*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEPT_RUNS:]:
        old.unlink(missing_ok=True)


def load_reply(state_dir: str | Path, client_id: str, key: str) -> dict[str, Any] | None:
    for path in (_reply_path(state_dir, client_id, key), Ledger.directory(state_dir, client_id) / REPLY_FILE):
        if path.exists():
            kept = torch.load(path, weights_only=True)
            if kept.get("key") == key:
                return kept["reply"]
    return None
