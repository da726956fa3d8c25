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
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Message

from common.model import state_norm

if TYPE_CHECKING:
    from server.mechanism import ClientLevelDP

log = logging.getLogger(__name__)


@dataclass
class SecureSum:
    """What SecAgg+ reveals of a round: the sum of the updates, never one of them."""

    total: dict[str, torch.Tensor]  # Σ of the contributors' (clipped) updates, unmasked
    contributors: list[str]  # clients that trained and whose update is in ``total``
    senders: int = 0  # clients whose masked vector is in ``total`` (declined ones sent zeros)
    fits: float = 0.0  # Σ of the "update fits under C" bits (adaptive clipping), also summed securely
    tolerance: float = 0.0  # bound on the fixed-point quantisation error of ``total``'s norm


@dataclass
class RoundReplies:
    """What one round's replies came to."""

    accepted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # client_id -> update
    declined: dict[str, str] = field(default_factory=dict)  # client_id -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # client or node -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> error
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> ledger summary
    fits: dict[str, bool] = field(default_factory=dict)  # client_id -> its update fit under C (adaptive)
    secure_sum: SecureSum | None = None  # with secagg: the unmasked sum instead of ``accepted``

    @property
    def trained(self) -> list[str]:
        """Clients whose update is in this round's aggregate."""
        return list(self.secure_sum.contributors) if self.secure_sum is not None else list(self.accepted)


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                 max_norm: float | None = None) -> str | None:
    """Why ``update`` must not be averaged, or None if it may.

    ``max_norm`` (client-level DP's C): an update above it would break the sensitivity
    the noise is calibrated for, so it is rejected, not clipped here.
    """
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
        norm = state_norm(update)
        if norm > max_norm:
            return f"update norm {norm:.6g} above the clipping norm {max_norm:.6g}"
    return None


def collect(
    replies: Iterable[Message],
    *,
    server_round: int,
    sampled: Mapping[int, str],
    expected: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> RoundReplies:
    """Sort replies into accepted / declined / rejected / failed.

    ``sampled`` maps the node ids asked this round to a label for logs; ``max_norm``
    is client-level DP's clipping norm (None: no norm bound).
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
        reason = check_update(update, expected, max_norm=max_norm)
        if reason is not None:
            out.rejected[client_id] = reason
            continue
        out.accepted[client_id] = update
        if "fits" in metrics:
            out.fits[client_id] = bool(int(metrics["fits"]))
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
    return apply_step(global_state, {k: v / len(updates) for k, v in sum_updates(updates, global_state).items()},
                      server_lr=server_lr)


def sum_updates(updates: Iterable[Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ updates in float64 (zeros shaped like ``like`` when there are none)."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    for update in updates:
        for name in total:
            total[name] += update[name].to(torch.float64)
    return total


def apply_step(global_state: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor], *,
               server_lr: float) -> dict[str, torch.Tensor]:
    """``global + server_lr · step``, back in each parameter's dtype."""
    return {name: (value.to(torch.float64) + server_lr * step[name].to(torch.float64)).to(value.dtype)
            for name, value in global_state.items()}


def check_sum(total: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
              max_norm: float | None) -> str | None:
    """Why an unmasked SecAgg sum must not be used: the server's only check under SecAgg."""
    return check_update(total, {k: v.to(torch.float64) for k, v in expected.items()}, max_norm=max_norm)


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    result: RoundReplies,
    *,
    server_lr: float,
    n_planned: int,
    client_dp: ClientLevelDP | None = None,
) -> dict[str, torch.Tensor] | None:
    """The next global state from a round's accepted updates (or SecAgg sum); None: not released.

    Without client-level DP: the equal-weight mean of the contributors' updates. With
    it: (Σ clipped updates + noise) / ``n_planned`` (``server.mechanism``), then C adapts.
    """
    contributors = result.trained
    if result.secure_sum is not None:
        total = result.secure_sum.total
        bound = None
        if client_dp is not None:
            bound = result.secure_sum.senders * client_dp.clipping_norm + result.secure_sum.tolerance
        reason = check_sum(total, global_state, max_norm=bound)
        if reason is not None:
            log.warning("unmasked secure sum rejected: %s; the round is not released", reason)
            return None
        fits = result.secure_sum.fits
    else:
        total = sum_updates(result.accepted.values(), global_state)
        fits = float(sum(result.fits.get(cid, False) for cid in contributors))
    if client_dp is None:
        if not contributors:
            return None
        return apply_step(global_state, {k: v / len(contributors) for k, v in total.items()}, server_lr=server_lr)
    step = client_dp.privatise(total, n_planned)
    client_dp.adapt(fits, n_planned)
    return apply_step(global_state, step, server_lr=server_lr)
