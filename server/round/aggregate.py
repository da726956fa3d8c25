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

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Message, RecordDict

from common.model.state import state_norm
from common.protocol import REPLY_RECORDS, SECURE_REPLY_RECORDS, ProtocolError, TrainReply
from common.recipe import HEAD_PREFIX, head_from_prototypes
from server.round.optimizer import FedAvg, ServerOptimizer

if TYPE_CHECKING:
    from common.privacy.mechanism import ClientLevelDP

log = logging.getLogger(__name__)

#: What a client may send (the allow-list; DESIGN.md "Privacy semantics"), derived from
#: the protocol's reply fields: anything else is refused, not ignored, so a client cannot
#: leak extra statistics through the server's logs or report. Under SecAgg+ the plain
#: part has no update and no ``fits`` (that bit is summed securely; in plain text it
#: would reveal one client's clipping outcome).
ALLOWED, SECURE_ALLOWED = REPLY_RECORDS, SECURE_REPLY_RECORDS
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
class SecureSum:
    """What SecAgg+ reveals of a round: the sum of the updates, never one of them."""

    total: dict[str, torch.Tensor]  # Σ of the contributors' (clipped) updates, unmasked
    contributors: list[str]  # clients that trained and whose update is in ``total``
    senders: int = 0  # clients whose masked vector is in ``total`` (declined ones sent zeros)
    fits: float = 0.0  # Σ of the "update fits under C" bits (adaptive clipping), also summed securely
    tolerance: float = 0.0  # bound on the fixed-point quantisation error of ``total``'s norm
    count: int | None = None  # distributed noise: the noised count of sampled examples, in count units
    integer: bool = False  # distributed noise: ``total`` is the exact integer sum of the releases (int64)


@dataclass
class RoundReplies:
    """What one round's replies came to."""

    accepted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # client_id -> update
    declined: dict[str, str] = field(default_factory=dict)  # client_id -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # client or node -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> error
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> ledger summary
    missing: list[int] = field(default_factory=list)  # sampled nodes that sent nothing in time
    failed_nodes: list[int] = field(default_factory=list)  # sampled nodes that replied with an error
    node_clients: dict[int, str] = field(default_factory=dict)  # node id -> client id it spoke for
    fits: dict[str, bool] = field(default_factory=dict)  # client_id -> its update fit under C (adaptive)
    masked: list[str] = field(default_factory=list)  # secagg: checked replies that trained (vector in the sum)
    secure_sum: SecureSum | None = None  # with secagg: the unmasked sum instead of ``accepted``
    secure_error: str | None = None  # with secagg: why no sum was revealed (not a client's failure)

    @property
    def trained(self) -> list[str]:
        """Clients whose update is in this round's aggregate."""
        return list(self.secure_sum.contributors) if self.secure_sum is not None else list(self.accepted)


def check_update(
    update: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` must not be averaged, or None if it may.

    ``max_norm`` is the tighter of ``strategy.max_update_norm`` and client-level DP's
    clipping norm C: an update above C would break the sensitivity the noise is
    calibrated for, so it is rejected, not clipped here.
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
            return f"update norm {norm:.6g} above the allowed {max_norm:.6g}"
    return None


def collect(
    replies: Iterable[Reply],
    *,
    server_round: int,
    sampled: Iterable[int],
    expected: Mapping[str, torch.Tensor],
    max_update_norm: float | None = None,
    secure: bool = False,
) -> RoundReplies:
    """Sort replies into accepted / declined / rejected / failed; name missing nodes.

    The one reply parser of both paths. Plain rounds (``secure=False``): every reply
    carries its update, which is checked here. SecAgg+ rounds (``secure=True``,
    ``server.round.secagg``): a reply carries only its plain metrics and privacy summary (its
    masked vector is already in the sum, which only ``check_sum`` can check), so
    ``SECURE_ALLOWED`` applies and a reply that passes every check is listed in
    ``masked`` (it trained) instead of ``accepted``.
    """
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
            # After client.app.public_reason the text is fixed (no device data); capped anyway.
            out.failed[node] = reply.error[:300]
            out.failed_nodes.append(reply.node_id)
            continue
        reason, client_id, parsed = check_reply(reply.content, server_round, out, secure=secure)
        update = None
        if reason is None and not parsed.declined:
            if secure:
                out.masked.append(client_id)  # its vector is in the sum, which only check_sum can check
            else:
                reason, update = _checked_update(parsed, expected, max_bytes, max_update_norm)
        if client_id is not None:
            out.node_clients[reply.node_id] = client_id
        if reason is not None:
            out.rejected[client_id or node] = reason
        elif update is not None:
            out.accepted[client_id] = update
            if parsed.fits is not None:
                out.fits[client_id] = parsed.fits
    out.missing = sorted(sampled - seen)
    for who, reason in out.rejected.items():
        log.warning("round %d: rejected reply of %s: %s", server_round, who, reason)
    for who, reason in out.failed.items():
        log.warning("round %d: %s failed: %s", server_round, who, reason)
    return out


def check_reply(
    content: RecordDict, server_round: int, out: RoundReplies, *, secure: bool = False
) -> tuple[str | None, str | None, TrainReply | None]:
    """(reason to reject or None, client id or None, the parsed reply or None): the checks
    every reply passes, plain or SecAgg+.

    A reply that follows the protocol (``common.protocol.TrainReply``: well-formed, only
    allow-listed records and keys), tagged with this round, the first for its client id.
    A reply that passes has its privacy summary kept in ``out.privacy`` and, if it
    declined, its reason in ``out.declined``.
    """
    try:
        reply = TrainReply.from_content(content, secure=secure)
    except ProtocolError as err:
        return err.reason, err.client_id, None
    cid = reply.client_id
    if reply.server_round != server_round:
        return f"reply for round {reply.server_round}, expected {server_round}", cid, None
    if cid in out.accepted or cid in out.declined or cid in out.masked:
        return "a second reply for this client id", cid, None
    if isinstance(reply.report, dict):
        out.privacy[cid] = reply.report
    if reply.declined:
        out.declined[cid] = reply.reason
    return None, cid, reply


def _checked_update(reply: TrainReply, expected, max_bytes, max_update_norm) -> tuple[str | None, dict | None]:
    """A plain reply's update: (reason to reject or None, the accepted update or None)."""
    try:
        update = reply.decoded_update(max_bytes)
    except ProtocolError as err:
        return err.reason, None
    reason = check_update(update, expected, max_norm=max_update_norm)
    return reason, (update if reason is None else None)


def _client_order(client_id: str):
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def sum_updates(
    updates: Mapping[str, Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Σ updates in float64, in client-id order so a resumed round reproduces the original."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    for client_id in sorted(updates, key=_client_order):
        for name in total:
            total[name] += updates[client_id][name].to(torch.float64)
    return total


def check_sum(
    total: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, max_norm: float | None
) -> str | None:
    """Why an unmasked SecAgg sum must not be used: the server's only check under SecAgg."""
    return check_update(total, {k: v.to(torch.float64) for k, v in expected.items()}, max_norm=max_norm)


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    result: RoundReplies,
    *,
    n_planned: int,
    client_dp: ClientLevelDP | None = None,
    optimizer: ServerOptimizer | None = None,
    server_round: int = 0,
    server_lr: float = 1.0,
    keys: Collection[str] | None = None,
    prototype_scale: float | None = None,
    exact: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor] | None:
    """The next global state from a round's accepted updates (or SecAgg sum); None: not released.

    The round's step, without client-level DP: the equal-weight mean of the contributors'
    updates. With it: (Σ clipped updates + noise) / ``n_planned`` (``common.privacy.mechanism``),
    then C adapts. ``optimizer`` (``server.round.optimizer``; None: FedAvg at ``server_lr``)
    turns that released step into the next global state: post-processing, no extra ε.

    ``keys``: the tensors this round's stage trains (the recipe's head rounds: the head);
    the others keep their global value, and client-level noise goes on these keys only
    (projecting the clipped sum onto them does not raise its sensitivity). With
    ``prototype_scale`` the round is the recipe's prototype release: the released mean of
    the clients' class sums (in the head's weight) becomes the head,
    ``common.recipe.head_from_prototypes``, and the optimizer takes no step.

    ``exact`` (distributed noise): the round's sum is the exact integer sum of the clients'
    noised releases (``SecureSum.integer``), read back with ``units`` integer units per real
    unit; a head step is −``lr`` × the summed gradient over the noised count (``count_units``
    per example), never over the clients' true counts.
    """
    contributors = result.trained
    if result.secure_sum is not None and result.secure_sum.integer:
        return _exact_step(global_state, result.secure_sum, exact, optimizer, server_round, keys, prototype_scale)
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
        total = sum_updates(result.accepted, global_state)
        fits = float(sum(result.fits.get(cid, False) for cid in contributors))
    if keys is not None:
        total = {k: v for k, v in total.items() if k in set(keys)}
    if client_dp is None:
        if not contributors:
            return None
        step = {k: v / len(contributors) for k, v in total.items()}
    else:
        step = client_dp.release(
            total, fits=fits, n_planned=n_planned, server_round=server_round, clients=len(contributors)
        )
    if prototype_scale is not None:
        weight = f"{HEAD_PREFIX}weight"
        new = {k: v.clone() for k, v in global_state.items()}
        new[weight] = head_from_prototypes(step[weight], prototype_scale).to(global_state[weight].dtype)
        return new
    step = {k: step[k] if k in step else torch.zeros(v.shape, dtype=torch.float64) for k, v in global_state.items()}
    # The one place the released step becomes the next global model.
    optimizer = optimizer if optimizer is not None else FedAvg(server_lr=server_lr)
    return optimizer.step(global_state, step, server_round=server_round)


def _exact_step(
    global_state: Mapping[str, torch.Tensor],
    secure: SecureSum,
    exact: Mapping[str, float] | None,
    optimizer: ServerOptimizer | None,
    server_round: int,
    keys: Collection[str] | None,
    prototype_scale: float | None,
) -> dict[str, torch.Tensor] | None:
    """The next global state from a distributed-noise sum (post-processing of the release)."""
    if exact is None:
        raise ValueError("an exact integer sum needs the stage's read-out (units, count_units, lr)")
    total = {k: v.to(torch.float64) / float(exact["units"]) for k, v in secure.total.items()}
    if keys is not None:
        total = {k: v for k, v in total.items() if k in set(keys)}
    if prototype_scale is not None:
        weight = f"{HEAD_PREFIX}weight"
        new = {k: v.clone() for k, v in global_state.items()}
        new[weight] = head_from_prototypes(total[weight], prototype_scale).to(global_state[weight].dtype)
        return new
    count = max(float(secure.count or 0) / float(exact["count_units"]), 1.0)
    for name, value in total.items():
        if not torch.isfinite(value).all():
            log.warning("distributed sum of %s is not finite; the round is not released", name)
            return None
    step = {
        k: (-float(exact["lr"]) * total[k] / count) if k in total else torch.zeros(v.shape, dtype=torch.float64)
        for k, v in global_state.items()
    }
    optimizer = optimizer if optimizer is not None else FedAvg(server_lr=1.0)
    return optimizer.step(global_state, step, server_round=server_round)
