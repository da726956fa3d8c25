"""Update checks and aggregation: every reply passes through here, and only here.

Flower's FedAvg averages NaN and broadcast-shaped updates and lets one client's
``num-examples`` claim decide the average (STACK.md). fedpriv instead checks each
reply against the expected trainable keys, shapes and dtypes, the round and the
sampled nodes, and averages accepted updates with *equal* weights: example counts
never travel, so no claim can tilt the average.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message

log = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """What one round's replies came to."""

    accepted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # client_id -> update
    declined: dict[str, str] = field(default_factory=dict)  # client_id -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # client or node -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> error
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> ledger summary


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
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
    return None


def collect(
    replies: Iterable[Message],
    *,
    server_round: int,
    sampled: Mapping[int, str],
    expected: Mapping[str, torch.Tensor],
) -> RoundReplies:
    """Sort replies into accepted / declined / rejected / failed.

    ``sampled`` maps the node ids asked this round to a label for logs.
    """
    out = RoundReplies()
    seen: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        who = f"node {node}"
        if node not in sampled or node in seen:
            out.rejected[who] = "not sampled this round" if node not in sampled else "second reply"
            continue
        seen.add(node)
        if reply.has_error():
            out.failed[who] = f"{reply.error.code}: {reply.error.reason}"[:300]
            continue
        content = reply.content
        try:
            privacy = content["privacy"]
            client_id = str(privacy["client-id"])
            summary = json.loads(str(privacy["report"]))
            metrics = content["metrics"]
            tagged_round = int(metrics["server-round"])
            declined = bool(int(metrics["declined"]))
        except (KeyError, ValueError, TypeError) as err:
            out.rejected[who] = f"malformed reply ({err.__class__.__name__}: {err})"
            continue
        if tagged_round != server_round:
            out.rejected[client_id] = f"reply for round {tagged_round}, expected {server_round}"
            continue
        if isinstance(summary, dict):
            out.privacy[client_id] = summary
        if declined:
            out.declined[client_id] = str(privacy["reason"])
            continue
        if "arrays" not in content:
            out.rejected[client_id] = "no update in a reply that did not decline"
            continue
        update = content["arrays"].to_torch_state_dict()
        reason = check_update(update, expected)
        if reason is not None:
            out.rejected[client_id] = reason
            continue
        out.accepted[client_id] = update
    for who, reason in out.rejected.items():
        log.warning("round %d: rejected reply of %s: %s", server_round, who, reason)
    for who, reason in out.failed.items():
        log.warning("round %d: %s failed: %s", server_round, who, reason)
    return out


def fedavg(
    global_state: Mapping[str, torch.Tensor],
    updates: Iterable[Mapping[str, torch.Tensor]],
    *,
    server_lr: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``global + server_lr · mean(updates)``, every client weighted equally."""
    updates = list(updates)
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    new_state = {}
    for name, value in global_state.items():
        mean = torch.stack([u[name].to(torch.float64) for u in updates]).mean(dim=0)
        new_state[name] = (value.to(torch.float64) + server_lr * mean).to(value.dtype)
    return new_state
