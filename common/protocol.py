"""The wire protocol between the server and a client: one train instruction, one reply.

Every key that travels is named here, once. The server builds a :class:`TrainInstruction`
and the client reads it back; the client builds a :class:`TrainReply` and the server
reads it back through :meth:`TrainReply.from_content`, whether it came as plain records
or, under SecAgg+, as the plain part of a legacy FitRes (``server.round.secagg.plain_part``).
The server's allow-list (``REPLY_RECORDS`` / ``SECURE_REPLY_RECORDS``) is derived from
the reply's fields, so a field cannot be added on one side and forgotten on the other.

What a reply may carry, and nothing else (DESIGN.md "Privacy semantics"): the update
(local − global trainable weights) unless the client declined; ``declined`` and the
round it answers; with client-level DP, ``fits`` (adaptive clipping's bit: the update
fit under C before clipping); the client id, a decline reason and the ledger summary.
No example count and no training loss ever travel. Under SecAgg+ neither the update nor
``fits`` is in plain text: both are in the masked vector, so only their sums are revealed.

A field missing from a message makes it malformed; nothing is filled in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Records of a message.
ARRAYS, CONFIG, METRICS, PRIVACY = "arrays", "config", "metrics", "privacy"
# Instruction keys (the ``config`` record; under SecAgg+ the legacy fit config).
RUN_ID, SERVER_ROUND, RUN_CONFIG, CLIENT_CLIP_NORM = "run-id", "server-round", "fedpriv-config", "client-clip-norm"
SECAGG_KEYS, SECAGG_RANGE = "fedpriv-keys", "secagg-range"
# Reply keys: ``metrics`` and ``privacy`` records.
DECLINED, FITS = "declined", "fits"
CLIENT_ID, REASON, REPORT = "client-id", "reason", "report"

#: A plain reply's records and their keys (``None``: the update, checked against the model).
REPLY_RECORDS: dict[str, frozenset[str] | None] = {
    ARRAYS: None,
    METRICS: frozenset({DECLINED, SERVER_ROUND, FITS}),
    PRIVACY: frozenset({CLIENT_ID, REASON, REPORT}),
}
#: The plain part of a SecAgg+ reply: no update and no ``fits`` in the clear.
SECURE_REPLY_RECORDS: dict[str, frozenset[str] | None] = {
    METRICS: frozenset({DECLINED, SERVER_ROUND}),
    PRIVACY: REPLY_RECORDS[PRIVACY],
}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``reason`` is what the server logs."""

    def __init__(self, reason: str, client_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.client_id = client_id


@dataclass(frozen=True)
class TrainInstruction:
    """What the server asks of a client for one round (besides the global weights)."""

    run_id: str
    server_round: int
    run_config: str  # the resolved run config as JSON: every client trains by the server's settings
    client_clip_norm: float | None = None  # client-level DP: clip the update to this C

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {RUN_ID: self.run_id, SERVER_ROUND: int(self.server_round), RUN_CONFIG: self.run_config}
        if self.client_clip_norm is not None:
            out[CLIENT_CLIP_NORM] = float(self.client_clip_norm)
        return out

    @classmethod
    def from_config(cls, config: Mapping) -> "TrainInstruction":
        clip = config.get(CLIENT_CLIP_NORM)
        return cls(
            str(config[RUN_ID]),
            int(config[SERVER_ROUND]),
            str(config[RUN_CONFIG]),
            float(clip) if clip is not None else None,
        )

    def cfg(self) -> dict:
        return json.loads(self.run_config)

    def to_content(self, global_state: Mapping[str, torch.Tensor]) -> RecordDict:
        """A plain round's train message."""
        return RecordDict(
            {ARRAYS: ArrayRecord(torch_state_dict=dict(global_state)), CONFIG: ConfigRecord(self.to_config())}
        )

    @staticmethod
    def from_content(content: RecordDict) -> tuple["TrainInstruction", dict[str, torch.Tensor]]:
        return TrainInstruction.from_config(content[CONFIG]), content[ARRAYS].to_torch_state_dict()

    def secure_config(self, keys: list[str], secagg_range: float) -> dict[str, Any]:
        """A SecAgg+ round's legacy fit config: the instruction, the order of the
        parameter arrays, and the range the clients quantise their vector to."""
        return {**self.to_config(), SECAGG_KEYS: json.dumps(list(keys)), SECAGG_RANGE: float(secagg_range)}

    @classmethod
    def from_secure_config(cls, config: Mapping) -> tuple["TrainInstruction", list[str], float]:
        return cls.from_config(config), json.loads(str(config[SECAGG_KEYS])), float(config[SECAGG_RANGE])


@dataclass(frozen=True)
class TrainReply:
    """A client's answer to one train instruction.

    ``update`` is None when the client declined. On the server, a parsed reply keeps its
    update undecoded in ``arrays`` until the checks that need no tensor have passed
    (:meth:`decoded_update`), so that an oversized payload is refused before it is read.
    """

    client_id: str
    server_round: int
    declined: bool
    reason: str = ""
    report: Any = field(default_factory=dict)  # the client's ledger summary (JSON on the wire)
    update: dict[str, torch.Tensor] | None = None
    fits: bool | None = None  # client-level DP only
    arrays: ArrayRecord | None = field(default=None, repr=False, compare=False)

    def _metrics(self, *, secure: bool) -> dict[str, int]:
        out = {DECLINED: int(self.declined), SERVER_ROUND: int(self.server_round)}
        if self.fits is not None and not secure:
            out[FITS] = int(self.fits)
        return out

    def _privacy(self) -> dict[str, str]:
        return {CLIENT_ID: self.client_id, REASON: self.reason, REPORT: json.dumps(self.report)}

    def to_content(self) -> RecordDict:
        """A plain reply."""
        content = RecordDict(
            {METRICS: MetricRecord(self._metrics(secure=False)), PRIVACY: ConfigRecord(self._privacy())}
        )
        if self.update is not None:
            content[ARRAYS] = ArrayRecord(torch_state_dict=self.update)
        return content

    def secure_metrics(self) -> dict[str, Any]:
        """The plain text of a SecAgg+ reply (the legacy FitRes metrics): never the update or ``fits``."""
        return {**self._metrics(secure=True), **self._privacy()}

    @classmethod
    def from_content(cls, content: RecordDict, *, secure: bool = False) -> "TrainReply":
        """Parse a reply's records; :class:`ProtocolError` if malformed or not allow-listed."""
        try:
            privacy, metrics = content[PRIVACY], content[METRICS]
            client_id = str(privacy[CLIENT_ID])
            server_round = int(metrics[SERVER_ROUND])
            declined = bool(int(metrics[DECLINED]))
            report = json.loads(str(privacy[REPORT]))
            reason = str(privacy[REASON]) if declined else str(privacy.get(REASON, ""))
        except (KeyError, ValueError, TypeError) as err:
            raise ProtocolError(f"malformed reply ({err.__class__.__name__}: {str(err)[:100]})") from None
        allowed = SECURE_REPLY_RECORDS if secure else REPLY_RECORDS
        for name in content.keys():
            if name not in allowed:
                raise ProtocolError(f"record {name!r} is not allowed", client_id)
            keys = allowed[name]
            if keys is not None and (extra := sorted(set(content[name].keys()) - keys)):
                raise ProtocolError(f"{name}: keys {extra} are not allowed", client_id)
        fits = bool(int(metrics[FITS])) if FITS in metrics else None
        arrays = content[ARRAYS] if ARRAYS in content else None
        return cls(client_id, server_round, declined, reason, report, None, fits, arrays)

    def decoded_update(self, max_bytes: int) -> dict[str, torch.Tensor]:
        """The update of a parsed reply that did not decline, read only if it fits ``max_bytes``."""
        if self.arrays is None:
            raise ProtocolError("no update in a reply that did not decline", self.client_id)
        size = self.arrays.count_bytes()
        if size > max_bytes:
            raise ProtocolError(f"payload of {size} bytes exceeds the model's {max_bytes}", self.client_id)
        try:
            return self.arrays.to_torch_state_dict()
        except Exception as err:  # a payload that does not even decode
            raise ProtocolError(f"undecodable update ({err.__class__.__name__})", self.client_id) from None


#: Set (to "1") in the environment of the processes that host a *simulation* (``fedpriv
#: simulate``'s runtimes, a local simulation SuperLink, the in-process grid's simulated
#: nodes). A ClientApp that does not see it is a device in deployment: its state directory
#: and privacy policy come from its own node-config alone. A message cannot set it.
SIMULATION_ENV = "FEDPRIV_SIMULATION"


@contextmanager
def simulation_env(**extra: str):
    """``SIMULATION_ENV`` (and ``extra`` variables) set in this process while the block runs,
    then as they were."""
    wanted = {SIMULATION_ENV: "1", **extra}
    before = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the evaluation message (type "evaluate"): after the last round, and every
# ``evaluation.client_every`` rounds, the server sends the global weights to every node; each
# device evaluates them on its own held-out part and trains its personal model
# (client.personal), all of which stays on the device. The reply carries one flag.
FINAL, EVALUATED = "final", "evaluated"
#: The evaluation reply's records and keys: nothing computed from the device's data.
EVALUATE_REPLY_RECORDS: dict[str, frozenset[str]] = {METRICS: frozenset({EVALUATED, SERVER_ROUND})}


@dataclass(frozen=True)
class EvaluateInstruction:
    """What the server asks of a device after a round: evaluate (and personalise) on the device."""

    run_id: str
    server_round: int
    run_config: str  # the resolved run config as JSON, as in a train instruction
    final: bool  # after the run's last round

    def cfg(self) -> dict:
        return json.loads(self.run_config)

    def to_content(self, global_state: Mapping[str, torch.Tensor]) -> RecordDict:
        config = {RUN_ID: self.run_id, SERVER_ROUND: int(self.server_round), RUN_CONFIG: self.run_config}
        config[FINAL] = int(self.final)
        return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=dict(global_state)), CONFIG: ConfigRecord(config)})

    @staticmethod
    def from_content(content: RecordDict) -> tuple["EvaluateInstruction", dict[str, torch.Tensor]]:
        config = content[CONFIG]
        instruction = EvaluateInstruction(
            str(config[RUN_ID]), int(config[SERVER_ROUND]), str(config[RUN_CONFIG]), bool(int(config[FINAL]))
        )
        return instruction, content[ARRAYS].to_torch_state_dict()


def evaluate_reply(server_round: int, evaluated: bool) -> RecordDict:
    """A device's answer to an evaluation message: whether it evaluated, and the round; nothing else."""
    return RecordDict({METRICS: MetricRecord({EVALUATED: int(evaluated), SERVER_ROUND: int(server_round)})})


def read_evaluate_reply(content: RecordDict) -> bool:
    """Whether the device evaluated; :class:`ProtocolError` for anything beyond the allow-list."""
    for name in content.keys():
        keys = EVALUATE_REPLY_RECORDS.get(name)
        if keys is None:
            raise ProtocolError(f"record {name!r} is not allowed in an evaluation reply")
        if extra := sorted(set(content[name].keys()) - keys):
            raise ProtocolError(f"{name}: keys {extra} are not allowed in an evaluation reply")
    try:
        return bool(int(content[METRICS][EVALUATED]))
    except (KeyError, ValueError, TypeError) as err:
        raise ProtocolError(f"malformed evaluation reply ({err.__class__.__name__})") from None
