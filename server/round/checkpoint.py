"""Server checkpoints: what a crashed run needs to continue, stored safely.

``checkpoints/round_NNNN.pt`` holds the global trainable weights after round N
(round 0 = the initial model); ``checkpoints/manifest.json`` maps each round to its
file and SHA-256, plus the run id (the client-level accountant resumes from
``client_level.json`` in the run directory, not from here). Files are written
atomically, and loaded with ``torch.load(weights_only=True)`` only after the hash
matches: a tampered or truncated checkpoint is refused, never unpickled.

A stateful server optimizer (``strategy=fedavgm`` / ``fedadam``, ``server.round.optimizer``)
adds ``checkpoints/optimizer_NNNN.pt`` per round — its momentum / moments after round
N — named with its SHA-256 and the optimizer's name in that round's manifest entry and
verified the same way. Resume needs the state after the last completed round (the
newest, or after a crash between checkpoint and metrics line the one before), so only
the last two are kept: with full fine-tuning they are twice the model's size each.
FedAvg is stateless and its checkpoints are exactly what they were.
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

from common.report.rundir import read_metrics
from common.rundir import RunDir
from common.storage import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
#: Optimizer states kept: the last completed round's and the one before (see above).
OPTIMIZER_STATES_KEPT = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, tampered with, or does not belong to this run."""


@dataclass
class Manifest:
    run_id: str
    # round -> {file, sha256} (+ optimizer, optimizer_file, optimizer_sha256 with a stateful optimizer)
    rounds: dict[int, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = RunDir(run_dir).checkpoints / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{path} is missing: {run_dir} has no checkpoints to resume from")
        raw = json.loads(path.read_text())
        # Older manifests also hold "server_state", which was always {}: ignored.
        return cls(raw["run_id"], {int(k): v for k, v in raw["rounds"].items()})

    def save(self, run_dir: Path) -> None:
        atomic_write_json(
            RunDir(run_dir).checkpoints / MANIFEST,
            {
                "run_id": self.run_id,
                "rounds": {str(k): v for k, v in sorted(self.rounds.items())},
            },
        )


def _write(run_dir: Path, name: str, obj: Any) -> str:
    """Atomically write ``obj`` (tensors in dicts) as ``checkpoints/name``; its SHA-256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    blob = buf.getvalue()
    atomic_write_bytes(RunDir(run_dir).checkpoints / name, blob)
    return hashlib.sha256(blob).hexdigest()


def _read(run_dir: Path, name: str, sha256: str) -> Any:
    """``checkpoints/name``, unpickled (weights only) only after its hash matches."""
    path = RunDir(run_dir).checkpoints / name
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match its SHA-256 in the manifest: refusing a tampered checkpoint")
    return torch.load(io.BytesIO(blob), weights_only=True)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def save_round(
    run_dir: Path,
    manifest: Manifest,
    server_round: int,
    state: Mapping[str, torch.Tensor],
    *,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    optimizer_name: str | None = None,
) -> None:
    """Durably store round ``server_round``'s global weights (and optimizer state), then the manifest.

    ``optimizer_state`` (a stateful server optimizer's ``state_dict()``, possibly empty
    before its first step) is written next to the weights; None: a stateless optimizer.
    """
    name = f"round_{server_round:04d}.pt"
    entry = {"file": name, "sha256": _write(run_dir, name, {k: v.detach().cpu() for k, v in state.items()})}
    if optimizer_state is not None:
        opt_name = f"optimizer_{server_round:04d}.pt"
        blob = {part: {k: v.detach().cpu() for k, v in tensors.items()} for part, tensors in optimizer_state.items()}
        entry.update(
            optimizer=str(optimizer_name), optimizer_file=opt_name, optimizer_sha256=_write(run_dir, opt_name, blob)
        )
    manifest.rounds[server_round] = entry
    stale = [
        r for r, e in manifest.rounds.items() if "optimizer_file" in e and r <= server_round - OPTIMIZER_STATES_KEPT
    ]
    for r in stale:  # forget them in the manifest first, then delete: never a dangling entry
        manifest.rounds[r] = {k: v for k, v in manifest.rounds[r].items() if not k.startswith("optimizer")}
    manifest.save(run_dir)
    for r in stale:
        (RunDir(run_dir).checkpoints / f"optimizer_{r:04d}.pt").unlink(missing_ok=True)


def load_round(run_dir: Path, manifest: Manifest, server_round: int) -> dict[str, torch.Tensor]:
    """Round ``server_round``'s global weights, verified against the manifest's hash."""
    entry = manifest.rounds.get(server_round)
    if entry is None:
        raise CheckpointError(f"no checkpoint of round {server_round} in {RunDir(run_dir).checkpoints}")
    state = _read(run_dir, entry["file"], entry["sha256"])
    if not _is_tensor_dict(state):
        raise CheckpointError(f"{RunDir(run_dir).checkpoints / entry['file']} does not hold a dict of tensors")
    return state


def load_optimizer_state(
    run_dir: Path, manifest: Manifest, server_round: int, *, optimizer_name: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The server optimizer's state after round ``server_round``, verified against the manifest's hash.

    Refused when the round has none (a stateful optimizer always stores one, even empty)
    or it was written by another optimizer.
    """
    entry = manifest.rounds.get(server_round)
    if entry is None:
        raise CheckpointError(f"no checkpoint of round {server_round} in {RunDir(run_dir).checkpoints}")
    if "optimizer_file" not in entry:
        raise CheckpointError(
            f"round {server_round} has no optimizer state in {RunDir(run_dir).checkpoints}: "
            f"cannot continue strategy {optimizer_name} exactly"
        )
    if entry.get("optimizer") != optimizer_name:
        raise CheckpointError(
            f"round {server_round}'s optimizer state belongs to {entry.get('optimizer')}, not {optimizer_name}"
        )
    state = _read(run_dir, entry["optimizer_file"], entry["optimizer_sha256"])
    if not isinstance(state, dict) or not all(_is_tensor_dict(part) for part in state.values()):
        raise CheckpointError(f"{RunDir(run_dir).checkpoints / entry['optimizer_file']} does not hold optimizer state")
    return state


def completed_rounds(run_dir: Path) -> list[dict]:
    """The rounds recorded in ``metrics.jsonl``; a torn last line (crash mid-append) is dropped.

    Read by :func:`common.report.read_metrics`, as ``fedpriv report`` reads it; resume
    adds that the rounds are exactly 1..n, since it continues after the last one.
    """
    try:
        records = read_metrics(run_dir, missing_ok=True)
    except ValueError as err:  # a corrupt line other than the torn tail
        raise CheckpointError(str(err)) from err
    rounds = [r["round"] for r in records]
    if rounds != list(range(1, len(rounds) + 1)):
        raise CheckpointError(f"{RunDir(run_dir).metrics}: rounds {rounds} are not 1..{len(rounds)}")
    return records


def truncate_metrics(run_dir: Path, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` with exactly ``records`` (drops a torn tail before appending)."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    atomic_write_bytes(RunDir(run_dir).metrics, text.encode())
