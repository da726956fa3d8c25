"""The device's own transparency log: what left this device, when, and what it cost.

``<state_dir>/<client_id>/transparency.jsonl``, beside the ledger, on the device; it is
never sent. Before a reply leaves, the client appends one line (:func:`record`):

- ``time`` (UTC, ISO 8601), ``run_id``, ``round``, ``event``: ``sent`` (a new update),
  ``declined`` (no update; ``reason`` says why, the same fixed text the server gets) or
  ``resent`` (the reply kept from an earlier answer to the same round, sent again: no new
  spend) or ``evaluated`` (the answer to an evaluation message: the device evaluated the
  global model on its held-out part and trained its personal model, all kept on the
  device; only a flag left, no tensor and no figure);
- what was sent: ``tensors`` (each tensor's name and shape; the values stay out of the
  log) and ``bytes``: the sum of Flower's ``count_bytes`` over the records of the reply.
  Under SecAgg+ a round is four messages; the line is written before the masked vector
  leaves (stage 3) with the bytes of the three messages so far, and the last stage
  (``unmask``) adds its own when it is sent (:func:`add_bytes`), so ``bytes`` is then the
  round's whole traffic from this device;
- the update's L2 norm before and after client-side clipping (client-level DP), and
  ``masked`` (SecAgg+: the server saw only the sum);
- ``protection``: the noise that protected it (mechanism, σ, clipping norm C, sampling
  rate q, steps; null when the update left with no noise added on the device) and
  ``epsilon_before`` / ``epsilon_after``: this device's cumulative sample-level ε before and
  after the round, at ``delta``, the δ its ledger is pinned to (null before its first spend);
- ``never_sent``: what never leaves this device.

Nothing in a line is derived from a single example: the norms are of the whole update,
σ, C and q are the run's settings and the device's sample rate (which the ledger's
history sends to the server anyway), ε is the ledger's. The log is a record for the
person who owns the device; the ledger, not this log, is what the accountant trusts.
Lines are written under a lock of their own (two runs may share a state directory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from client.privacy.ledger import Ledger, locked
from common.model.state import state_norm
from common.storage import append_json_line, atomic_write_bytes, read_json_lines

LOG = "transparency.jsonl"
LOCK = ".transparency.lock"  # its own: a decline for a busy ledger must not wait for the ledger
SENT, DECLINED, RESENT, EVALUATED = "sent", "declined", "resent", "evaluated"
EVENTS = (SENT, DECLINED, RESENT, EVALUATED)
NEVER_SENT = (
    "training examples (texts)",
    "labels",
    "per-example gradients",
    "training losses",
    "the number of examples",
)


def log_path(state_dir: str | Path, client_id: str) -> Path:
    return Ledger.directory(state_dir, client_id) / LOG


def content_bytes(content: RecordDict) -> int:
    """What a reply weighs on the wire, as Flower counts it: the sum over its records."""
    return int(sum(_record_bytes(record) for record in content.values()))


def _record_bytes(record) -> int:
    try:
        return record.count_bytes()
    except ValueError:
        # flwr 1.42's ConfigRecord.count_bytes raises on an empty str or bytes value (its
        # length 0 reads as an unknown type), as in every reply that did not decline
        # (``reason`` is ""): count the rest as Flower does, and those keys alone.
        empty = [k for k, v in record.items() if isinstance(v, (str, bytes)) and len(v) == 0]
        rest = type(record)({k: v for k, v in record.items() if k not in empty})
        return rest.count_bytes() + sum(len(k) for k in empty)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


@dataclass(frozen=True)
class Reply:
    """What one reply's line says, fixed once the round is answered; what travelled and its
    size are known only when it is sent (:func:`record`'s other arguments)."""

    run_id: str
    server_round: int
    event: str  # one of EVENTS
    update: Mapping[str, torch.Tensor] | None  # what the reply carries, after clipping (None: declined)
    protection: Mapping[str, Any] | None  # client.round.RoundOutcome.protection
    reason: str = ""
    norm_before_clip: float | None = None  # client-level DP: the update's norm before clipping


def record(
    state_dir: str | Path,
    client_id: str,
    reply: Reply,
    *,
    sent_bytes: int,
    masked: bool = False,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Append the line for one reply; call it before the reply leaves.

    ``tensors``: what travelled if not the update itself (SecAgg+'s vector holds every key,
    zeros for a decline): only names and shapes are logged.
    """
    event, update, norm_before_clip = reply.event, reply.update, reply.norm_before_clip
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    protection = dict(reply.protection or {})
    line = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": reply.run_id,
        "round": int(reply.server_round),
        "event": event,
        "tensors": {k: list(v.shape) for k, v in (tensors if tensors is not None else update or {}).items()},
        "bytes": int(sent_bytes),
        "update_norm_before_clip": _finite(
            norm_before_clip if norm_before_clip is not None else (state_norm(update) if update else None)
        ),
        "update_norm_after_clip": _finite(state_norm(update)) if update else None,
        "masked": bool(masked),
        "protection": {
            k: protection[k] for k in ("mechanism", "sigma", "clip_norm", "sample_rate", "steps") if k in protection
        }
        or None,
        "epsilon_before": protection.get("epsilon_before"),
        "epsilon_after": protection.get("epsilon_after"),
        "delta": protection.get("delta"),  # the ledger's δ: an ε means nothing without it
        "reason": reply.reason if event == DECLINED else "",
        "never_sent": list(NEVER_SENT),
    }
    if "noise_share" in protection:  # distributed noise: this device's share, and its message's own ε
        line["noise_share"] = protection["noise_share"]
        line["epsilon_local"] = protection.get("epsilon_local")
        # The release is integers (scaled, rounded, noised): an update norm would mean nothing here.
        line["update_norm_before_clip"] = line["update_norm_after_clip"] = None
    with locked(state_dir, client_id, lock_file=LOCK):
        append_json_line(log_path(state_dir, client_id), line)
    return line


def add_bytes(state_dir: str | Path, client_id: str, *, run_id: str, server_round: int, extra: int) -> None:
    """Add a later message of the same round (SecAgg+'s unmask stage) to that round's line."""
    path = log_path(state_dir, client_id)
    with locked(state_dir, client_id, lock_file=LOCK):
        lines = read(state_dir, client_id)
        for line in reversed(lines):
            if line["run_id"] == run_id and line["round"] == int(server_round):
                line["bytes"] += int(extra)
                break
        else:
            return  # no line for that round (the round's training stage never ran here)
        text = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines)
        atomic_write_bytes(path, text.encode())


def read(state_dir: str | Path, client_id: str) -> list[dict]:
    """The log's lines in order; a torn last line (a crash mid-append) is dropped."""
    path = log_path(state_dir, client_id)
    return read_json_lines(path) if path.exists() else []


def clients(state_dir: str | Path) -> list[str]:
    """The client ids under ``state_dir`` that keep a transparency log."""
    root = Path(state_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / LOG).is_file() and not p.name.startswith("."))
