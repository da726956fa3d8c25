"""Update checks and aggregation: every reply passes through here, and only here.

Flower's FedAvg averages NaN and broadcast-shaped updates and lets one client's
``num-examples`` claim decide the average (STACK.md). fedpriv instead checks each
reply — sender sampled this round, tagged with this round, only allow-listed
records and keys, a payload no larger than the model's trainable part, exactly the
expected keys, shapes and dtypes, finite values, an optional norm cap — and
averages accepted updates with *equal* weights, in client-id order, so that no
claim can tilt the average and the result does not depend on arrival order.
A rejected reply is logged with its reason and counted; it never reaches the sum.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message, RecordDict

log = logging.getLogger(__name__)

#: What a client may send besides its update (the allow-list; DESIGN.md "Privacy
#: semantics"): record name -> keys. Anything else is refused, not ignored, so a
#: client cannot leak extra statistics through the server's logs or report.
ALLOWED = {
    "arrays": None,  # the update itself, checked key by key against the model
    "metrics": {"declined", "server-round"},
    "privacy": {"client-id", "reason", "report"},
}
#: Slack on the payload size for per-array metadata.
PAYLOAD_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """The parts of a Flower reply that the checks look at (testable without a run)."""

    node_id: int
    content: RecordDict | None
    error: str | None = None

    @classmethod
    def of(cls, message: Message) -> "Reply":
        if message.has_error():
            return cls(message.metadata.src_node_id, None, f"{message.error.code}: {message.error.reason}")
        return cls(message.metadata.src_node_id, message.content)


@dataclass
class RoundReplies:
    """What one round's replies came to."""

    accepted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # client_id -> update
    declined: dict[str, str] = field(default_factory=dict)  # client_id -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # client or node -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> error
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> ledger summary
    missing: list[int] = field(default_factory=list)  # sampled nodes that sent nothing in time


def check_update(
    update: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` must not be averaged, or None if it may."""
    missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
    if missing or extra:
        return f"keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, ref in expected.items():
        value = update[name]
        if not isinstance(value, torch.Tensor):
            return f"{name}: not a tensor"
        if value.dtype != ref.dtype:
            return f"{name}: dtype {value.dtype} != {ref.dtype}"
        if value.shape != ref.shape:  # exact: a broadcastable shape is still wrong
            return f"{name}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
        if not torch.isfinite(value).all():
            return f"{name}: non-finite values"
    if max_norm is not None:
        norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in update.values())))
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds strategy.max_update_norm={max_norm}"
    return None


def _unexpected_records(content: RecordDict) -> str | None:
    for name in content.keys():
        if name not in ALLOWED:
            return f"record {name!r} is not allowed"
        allowed_keys = ALLOWED[name]
        if allowed_keys is not None:
            extra = sorted(set(content[name].keys()) - allowed_keys)
            if extra:
                return f"{name}: keys {extra} are not allowed"
    return None


def collect(
    replies: Iterable[Reply],
    *,
    server_round: int,
    sampled: Iterable[int],
    expected: Mapping[str, torch.Tensor],
    max_update_norm: float | None = None,
) -> RoundReplies:
    """Sort replies into accepted / declined / rejected / failed."""
    out = RoundReplies()
    sampled = set(sampled)
    seen: set[int] = set()
    max_bytes = sum(t.numel() * t.element_size() for t in expected.values()) + PAYLOAD_SLACK_BYTES
    for reply in replies:
        node = f"node {reply.node_id}"
        if reply.node_id not in sampled:
            out.rejected[node] = "not sampled this round"
            continue
        if reply.node_id in seen:
            out.rejected[node] = "second reply in one round"
            continue
        seen.add(reply.node_id)
        if reply.error is not None:
            out.failed[node] = reply.error[:300]
            continue
        reason, client_id, update = _check_reply(reply.content, server_round, expected, max_bytes,
                                                 max_update_norm, out)
        if reason is not None:
            out.rejected[client_id or node] = reason
        elif update is not None:
            out.accepted[client_id] = update
    out.missing = sorted(sampled - seen)
    for who, reason in out.rejected.items():
        log.warning("round %d: rejected reply of %s: %s", server_round, who, reason)
    for who, reason in out.failed.items():
        log.warning("round %d: %s failed: %s", server_round, who, reason)
    return out


def _check_reply(content, server_round, expected, max_bytes, max_update_norm, out: RoundReplies):
    """(reason to reject or None, client id or None, accepted update or None)."""
    try:
        privacy = content["privacy"]
        client_id = str(privacy["client-id"])
        metrics = content["metrics"]
        tagged_round = int(metrics["server-round"])
        declined = bool(int(metrics["declined"]))
        summary = json.loads(str(privacy["report"]))
    except (KeyError, ValueError, TypeError) as err:
        return f"malformed reply ({err.__class__.__name__}: {err})", None, None
    if (reason := _unexpected_records(content)) is not None:
        return reason, client_id, None
    if tagged_round != server_round:
        return f"reply for round {tagged_round}, expected {server_round}", client_id, None
    if client_id in out.accepted or client_id in out.declined:
        return "a second reply for this client id", client_id, None
    if isinstance(summary, dict):
        out.privacy[client_id] = summary
    if declined:
        out.declined[client_id] = str(privacy["reason"])
        return None, client_id, None
    if "arrays" not in content:
        return "no update in a reply that did not decline", client_id, None
    size = content["arrays"].count_bytes()
    if size > max_bytes:
        return f"payload of {size} bytes exceeds the model's {max_bytes}", client_id, None
    try:
        update = content["arrays"].to_torch_state_dict()
    except Exception as err:  # a payload that does not even decode
        return f"undecodable update ({err.__class__.__name__})", client_id, None
    reason = check_update(update, expected, max_norm=max_update_norm)
    return reason, client_id, (update if reason is None else None)


def fedavg(
    global_state: Mapping[str, torch.Tensor],
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    server_lr: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``global + server_lr · mean(updates)``, every client weighted equally.

    Summed in client-id order (float64) so a resumed round reproduces the original.
    """
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    ordered = [updates[cid] for cid in sorted(updates, key=_client_order)]
    new_state = {}
    for name, value in global_state.items():
        mean = torch.stack([u[name].to(torch.float64) for u in ordered]).mean(dim=0)
        new_state[name] = (value.to(torch.float64) + server_lr * mean).to(value.dtype)
    return new_state


def _client_order(client_id: str):
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)
