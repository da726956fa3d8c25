"""The fedpriv ClientApp: a thin Flower handler around ``client.round.run_round``.

Message contract: ``common.protocol`` (a :class:`TrainInstruction` with the global
trainable weights in; a :class:`TrainReply` out: the update unless the client declined,
the round, the client id, a decline reason and the ledger summary). Nothing else leaves
the client: no example count, no training loss.

A request that fails on the device leaves it as an error whose text is fixed: a reason,
plus the setting's name for a :class:`common.errors.ConfigError`, else only the
exception's class name (:func:`public_reason`). Flower sends ``str(exc)`` to the server,
which logs it and writes it to ``metrics.jsonl``; an exception's own text can carry a
label, a path or a row of the device's data, so that text stays in the device's log.

Client-level DP: the instruction also holds C; the update is clipped to it and ``fits``
says whether it fit unclipped (adaptive clipping's bit). SecAgg+
rounds arrive as Flower's legacy SecAgg+ messages: see ``client/secagg.py``.

Before a reply leaves, the device appends what it sends and what that cost to its own
transparency log (``client/privacy/transparency.py``); the log never leaves the device.
"""

from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # before this module's own imports: what a fresh message pays for them

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.device import release_memory
from client.personal import evaluate_on_device
from client.privacy import transparency
from client.privacy.ledger import Ledger
from client.privacy.node_config import ClientIdentity, node_identity
from client.privacy.policy import refusal, setting_name
from client.round import current_epsilon, privacy_summary, run_round
from client.secagg import is_secagg, secagg_train
from common.errors import ConfigError
from common.model.state import state_norm
from common.privacy.mechanism import clip_update
from common.protocol import EvaluateInstruction, TrainInstruction, TrainReply, evaluate_reply

app = ClientApp()
logging.getLogger("flwr").propagate = False
log = logging.getLogger(__name__)
_IMPORTED = time.time()

#: Set by fedpriv-superexec (client/launcher.py) in a message's forked process: when it began.
FORKED_AT = "FEDPRIV_FORKED_AT"


class DeviceError(RuntimeError):
    """What leaves the device when a request fails here: a fixed text, never data."""


def public_reason(exc: BaseException) -> str:
    """The text that may leave the device for ``exc``: no value, path or row of its data."""
    if isinstance(exc, ConfigError):
        name = setting_name(getattr(exc, "setting", ""))
        return f"the device refused the request: setting {name} is invalid; details are in the device's log"
    return f"training failed on the device ({type(exc).__name__}); details are in the device's log"


def identity(context: Context, cfg: dict) -> ClientIdentity:
    """This client's identity and own settings, from its node config (client.privacy.node_config)."""
    return node_identity(context.node_config, cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Answer a train request (plain or a SecAgg+ stage); a failure leaves with a fixed text only."""
    started = time.time()
    timings: dict[str, Any] = {}  # the round's (RoundOutcome.timings), once one is answered
    try:
        return _train(msg, context, timings)
    except Exception as exc:
        # The full detail stays here, in the device's own log; the server gets public_reason.
        log.exception("this device could not answer the train request (kept on the device)")
        raise DeviceError(public_reason(exc)) from None
    finally:
        if os.environ.get("FEDPRIV_PROFILE"):
            _profile(os.environ["FEDPRIV_PROFILE"], started, timings)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this device's held-out part and train its personal model
    (client.personal), all kept on the device; the reply says only whether it did."""
    try:
        return _evaluate(msg, context)
    except Exception as exc:
        log.exception("this device could not answer the evaluation request (kept on the device)")
        raise DeviceError(public_reason(exc)) from None
    finally:
        release_memory()


def _evaluate(msg: Message, context: Context) -> Message:
    instruction, global_state = EvaluateInstruction.from_content(msg.content)
    try:
        cfg = instruction.cfg()
    except ValueError:
        cfg = None  # not JSON: refused by evaluate_on_device as an invalid config
    who = identity(context, cfg if isinstance(cfg, dict) else {})
    done = evaluate_on_device(
        cfg,
        who,
        run_id=instruction.run_id,
        server_round=instruction.server_round,
        global_state=global_state,
        final=instruction.final,
    )
    if not done.ok:
        log.warning("client %s: no evaluation for round %d: %s", who.client_id, instruction.server_round, done.reason)
    content = evaluate_reply(instruction.server_round, done.ok)
    ledger = Ledger.load(who.state_dir, who.client_id)  # read only: an evaluation spends nothing
    unchanged = {
        "epsilon_before": current_epsilon(ledger),
        "epsilon_after": current_epsilon(ledger),
        "delta": ledger.delta,
    }
    line = transparency.Reply(instruction.run_id, instruction.server_round, transparency.EVALUATED, None, unchanged)
    transparency.record(who.state_dir, who.client_id, line, sent_bytes=transparency.content_bytes(content))
    return Message(content=content, reply_to=msg)


def _process_started() -> float | None:
    """This process' start (Unix time), from /proc: Linux only, else None."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/stat") as system:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
            boot = next(float(line.split()[1]) for line in system if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _profile(path: str, started: float, timings: dict[str, Any]) -> None:
    """One line of this message's timings (see the module's docstring); never fails the reply.
    ``timings``: its round's (empty when the message answered no round)."""
    try:
        forked = os.environ.get(FORKED_AT)  # a fork of fedpriv-superexec's warm parent: imported before
        line = {
            "pid": os.getpid(),
            "process_started": float(forked) if forked else _process_started(),
            "import_started": _IMPORT_STARTED,
            "imported": _IMPORTED,
            "handler_started": started,
            "handler_ended": time.time(),
            "warm": bool(forked),
            **timings,
        }
        with open(path, "a") as out:
            out.write(json.dumps(line) + "\n")
    except Exception:  # a profile must never replace the reply or its error
        log.warning("FEDPRIV_PROFILE: could not append this message's timings")


def _train(msg: Message, context: Context, timings: dict[str, Any]) -> Message:
    def timed(instruction: TrainInstruction, global_state: dict, context: Context, *, secure: bool = True) -> Answered:
        answered = answer(instruction, global_state, context, secure=secure)
        timings.update(answered.timings)  # for train()'s profile line, whichever path answered
        return answered

    if is_secagg(msg):  # a SecAgg+ round: Flower's mod drives the stages (client/secagg.py)
        return secagg_train(msg, context, timed)
    instruction, global_state = TrainInstruction.from_content(msg.content)
    answered = timed(instruction, global_state, context, secure=False)
    content = answered.reply.to_content()
    answered.log(transparency.content_bytes(content))  # before it leaves
    return Message(content=content, reply_to=msg)


@dataclass
class Answered:
    """A reply and what the device's transparency log says about it once its size is known."""

    reply: TrainReply
    who: ClientIdentity
    run_id: str
    event: str
    protection: dict[str, Any] | None
    norm_before_clip: float | None = None
    timings: dict[str, Any] = field(default_factory=dict)  # the round's, for the profile line; never sent

    def log(self, sent_bytes: int, *, masked: bool = False, tensors: dict | None = None) -> dict:
        """Append this reply's line to the log (``tensors``: what travelled, if not the update)."""
        line = transparency.Reply(
            self.run_id,
            self.reply.server_round,
            self.event,
            self.reply.update,
            self.protection,
            self.reply.reason,
            self.norm_before_clip,
        )
        return transparency.record(
            self.who.state_dir, self.who.client_id, line, sent_bytes=sent_bytes, masked=masked, tensors=tensors
        )


def answer(instruction: TrainInstruction, global_state: dict, context: Context, *, secure: bool = True) -> Answered:
    """The reply to one training request, plain or SecAgg+.

    First the device's own checks (``client.privacy.policy``): the run config must pass the
    server's validator and the owner's policy, else the device declines before it reads
    its data or touches its ledger. ``secure``: the request came as a SecAgg+ round (the plain
    path passes False: a distributed-noise round is then declined, its share would leave alone).
    With client-level DP (C in the instruction) the update
    is clipped to C here, after the ledger committed the unclipped reply: clipping is a
    deterministic post-processing, so a resent round clips the kept reply identically.
    """
    try:
        cfg = instruction.cfg()
    except ValueError:
        cfg = None  # not JSON: declined below as an invalid config
    who = identity(context, cfg if isinstance(cfg, dict) else {})
    refused = refusal(cfg, who, client_clip_norm=instruction.client_clip_norm, secure=secure)
    if refused is not None:
        return _declined(instruction, who, cfg, *refused)
    try:
        outcome = run_round(
            cfg, who, run_id=instruction.run_id, server_round=instruction.server_round, global_state=global_state
        )
    finally:
        release_memory()  # an idle device holds no GPU cache between rounds
    update, fits, norm_before = outcome.update, None, None
    if update is not None and instruction.client_clip_norm is not None:
        norm_before = state_norm(update)
        clipped = clip_update(update, instruction.client_clip_norm)
        update, fits = clipped.update, clipped.fits
    reply = TrainReply(
        who.client_id, instruction.server_round, outcome.declined, outcome.reason, outcome.privacy, update, fits
    )
    event = transparency.DECLINED if outcome.declined else transparency.RESENT if outcome.resent else transparency.SENT
    return Answered(reply, who, instruction.run_id, event, outcome.protection, norm_before, outcome.timings)


def _declined(instruction: TrainInstruction, who: ClientIdentity, cfg, reason: str, valid: bool) -> Answered:
    """A decline by the device's own checks: nothing trained, nothing spent, the ledger only read."""
    log.warning("client %s declines round %d: %s", who.client_id, instruction.server_round, reason)
    ledger = Ledger.load(who.state_dir, who.client_id)  # atomic writes: a consistent read without the lock
    summary = privacy_summary(cfg, who, ledger, instruction.run_id) if valid else {"client_id": who.client_id}
    eps = current_epsilon(ledger)
    protection = {"epsilon_before": eps, "epsilon_after": eps, "delta": ledger.delta}
    reply = TrainReply(who.client_id, instruction.server_round, True, reason, summary, None, None)
    return Answered(reply, who, instruction.run_id, transparency.DECLINED, protection)
