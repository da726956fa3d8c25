"""Server checkpoints: what a crashed run needs to continue, stored safely.

``checkpoints/round_NNNN.pt`` holds the global trainable weights after round N
(round 0 = the initial model); ``checkpoints/manifest.json`` maps each round to its
file and SHA-256 plus the run id and any server-side state (e.g. a client-level
accountant). Files are written atomically, and loaded with
``torch.load(weights_only=True)`` only after the hash matches: a tampered or
truncated checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.storage import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, tampered with, or does not belong to this run."""


@dataclass
class Manifest:
    run_id: str
    rounds: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> {file, sha256}
    server_state: dict[str, Any] = field(default_factory=dict)  # latest extra state (JSON)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = run_dir / "checkpoints" / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{path} is missing: {run_dir} has no checkpoints to resume from")
        raw = json.loads(path.read_text())
        return cls(raw["run_id"], {int(k): v for k, v in raw["rounds"].items()}, raw.get("server_state", {}))

    def save(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / "checkpoints" / MANIFEST, {
            "run_id": self.run_id,
            "rounds": {str(k): v for k, v in sorted(self.rounds.items())},
            "server_state": self.server_state,
        })


def save_round(run_dir: Path, manifest: Manifest, server_round: int, state: Mapping[str, torch.Tensor],
               server_state: Mapping[str, Any] | None = None) -> None:
    """Durably store round ``server_round``'s global weights, then the manifest."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    blob = buf.getvalue()
    name = f"round_{server_round:04d}.pt"
    atomic_write_bytes(run_dir / "checkpoints" / name, blob)
    manifest.rounds[server_round] = {"file": name, "sha256": hashlib.sha256(blob).hexdigest()}
    manifest.server_state = dict(server_state or {})
    manifest.save(run_dir)


def load_round(run_dir: Path, manifest: Manifest, server_round: int) -> dict[str, torch.Tensor]:
    """Round ``server_round``'s global weights, verified against the manifest's hash."""
    entry = manifest.rounds.get(server_round)
    if entry is None:
        raise CheckpointError(f"no checkpoint of round {server_round} in {run_dir / 'checkpoints'}")
    path = run_dir / "checkpoints" / entry["file"]
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its SHA-256 in the manifest: refusing a tampered checkpoint")
    state = torch.load(io.BytesIO(blob), weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return state


def completed_rounds(run_dir: Path) -> list[dict]:
    """The rounds recorded in ``metrics.jsonl``; a torn last line (crash mid-append) is dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated tail of an interrupted append
                break
            raise CheckpointError(f"{path}: line {i + 1} is not JSON")
    rounds = [r["round"] for r in records]
    if rounds != list(range(1, len(rounds) + 1)):
        raise CheckpointError(f"{path}: rounds {rounds} are not 1..{len(rounds)}")
    return records


def truncate_metrics(run_dir: Path, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` with exactly ``records`` (drops a torn tail before appending)."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())
