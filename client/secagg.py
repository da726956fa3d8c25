"""The client's side of a SecAgg+ round: Flower's ``secaggplus_mod`` around fedpriv's answer.

The server drives Flower's legacy SecAgg+ workflow (``server/round/secagg.py``), so a
secure round reaches the ClientApp as four ``train`` messages carrying the record
``secaggplus_configs``. Flower's ``secaggplus_mod`` handles the key exchange and the
masking; for the masked-vector stage it calls ``legacy_fit`` here, which speaks the
legacy FitIns/FitRes format (``recorddict_compat``) and returns:

- the update in the order of the instruction's keys plus one array ``[fits · R]``
  (adaptive clipping's bit, so that only its sum is revealed) — the mod masks all of it
  and clears the plain arrays before anything leaves;
- plain metrics: the reply's plain part (``common.protocol.TrainReply.secure_metrics``).

Update checks run here, before masking (DESIGN.md): under SecAgg the server can only
check the sum. A declining client still sends a vector of zeros so that the protocol's
masks cancel; it contributes nothing and the server counts it as declined.

The device's transparency log (``client/privacy/transparency.py``) counts every message this
device sends in the round: the bytes of the first two stages are kept in the node's
``context.state`` until the masked-vector stage writes the round's line (before the
masked vector leaves); the unmask stage then adds its own bytes to that line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.privacy import transparency
from common.errors import ConfigError
from common.model.state import state_norm
from common.privacy.discrete import CLIENT_RANGE, MODULUS
from common.privacy.distributed import COUNT_KEY, distributed
from common.protocol import TrainInstruction

# answer(instruction, global_state, context) -> client.app.Answered (its .reply a TrainReply, its .log the line)
Answer = Callable[[TrainInstruction, Mapping[str, torch.Tensor], Context], Any]
#: This device's bytes so far in the current SecAgg+ round, and which round's line the unmask stage adds to.
_TRAFFIC = "fedpriv.secagg-traffic"


def _distributed_request(instruction: TrainInstruction) -> bool:
    """Whether the run asks for distributed noise (an unreadable config is declined by ``answer``)."""
    try:
        cfg = instruction.cfg()
        return isinstance(cfg, dict) and distributed(cfg)
    except (ValueError, KeyError, TypeError):
        return False


def is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_train(msg: Message, context: Context, answer: Answer) -> Message:
    """One SecAgg+ stage; the masked-vector stage trains through ``answer``."""
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    answered = []
    out = secaggplus_mod(msg, context, lambda m, c: legacy_fit(m, c, answer, answered))
    sent = transparency.content_bytes(out.content) if out.has_content() else 0
    traffic = context.state.config_records.get(_TRAFFIC)
    so_far = int(traffic["bytes"]) if traffic is not None and stage != Stage.SETUP else 0
    if stage == Stage.COLLECT_MASKED_VECTORS and answered:
        done, arrays = answered[0]
        done.log(so_far + sent, masked=True, tensors=arrays)  # before the masked vector leaves
        context.state.config_records[_TRAFFIC] = ConfigRecord(
            {
                "bytes": 0,
                "run-id": done.run_id,
                "round": int(done.reply.server_round),
                "client-id": done.who.client_id,
                "state-dir": str(done.who.state_dir),
            }
        )
    elif stage == Stage.UNMASK and traffic is not None and "run-id" in traffic:
        transparency.add_bytes(
            str(traffic["state-dir"]),
            str(traffic["client-id"]),
            run_id=str(traffic["run-id"]),
            server_round=int(traffic["round"]),
            extra=sent,
        )
        del context.state.config_records[_TRAFFIC]
    else:
        context.state.config_records[_TRAFFIC] = ConfigRecord({"bytes": so_far + sent})
    return out


def secure_vector(
    update: Mapping[str, torch.Tensor] | None,
    global_state: Mapping[str, torch.Tensor],
    keys: list[str],
    *,
    fits: bool,
    clipping_range: float,
    max_norm: float | None,
) -> list[np.ndarray]:
    """The arrays to mask: the checked update in ``keys`` order, then ``[fits · R]``."""
    if update is None:  # declined: zeros keep the protocol whole and add nothing
        update = {k: torch.zeros_like(v) for k, v in global_state.items()}
    if set(update) != set(keys) or set(global_state) != set(keys):
        raise ValueError("update keys differ from the global trainable keys")
    for name in keys:
        if update[name].shape != global_state[name].shape:
            raise ValueError(f"{name}: shape {tuple(update[name].shape)} != {tuple(global_state[name].shape)}")
    norm = state_norm(update)
    if norm == float("inf"):
        raise ValueError("update is not finite")
    if max_norm is not None and norm > max_norm:
        raise ValueError(f"update norm {norm:.6g} above the clipping norm {max_norm:.6g}")
    arrays = [update[k].detach().cpu().numpy() for k in keys]
    return [*arrays, np.array([float(clipping_range) if fits else 0.0])]


def exact_vector(
    update: Mapping[str, torch.Tensor] | None, global_state: Mapping[str, torch.Tensor], keys: list[str]
) -> list[np.ndarray]:
    """Distributed noise: the integer release in ``keys`` order, then its count, as floats that
    Flower's SecAgg+ maps to exactly these integers.

    With clipping range ½, quantisation range R = 2**30, weight 1 of max weight R and modulus
    2**31 (``server.round.secagg.exact_workflow``), Flower's quantiser computes (x/R + ½)·R = x + R/2
    exactly for every integer x in [−R/2, R/2): no clipping and no rounding touch it, and the server
    recovers the exact sum modulo 2**31. A coordinate outside that range is refused here, never
    wrapped (the round's checks make it impossible but for a noise draw beyond 2**29, whose
    probability is below 1e-300).
    """
    if update is None:  # declined: zeros keep the protocol whole and add nothing (no share either)
        update = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in global_state.items()}
        update[COUNT_KEY] = torch.zeros(1, dtype=torch.int64)
    if set(update) != {*keys, COUNT_KEY}:
        raise ValueError("distributed release keys differ from the global trainable keys")
    out = []
    for name in [*keys, COUNT_KEY]:
        value = update[name]
        if value.dtype != torch.int64:
            raise ValueError(f"{name}: a distributed release is int64, got {value.dtype}")
        if name in global_state and value.shape != global_state[name].shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(global_state[name].shape)}")
        ints = value.numpy().astype(np.int64)
        if ints.size and int(np.abs(ints).max()) >= CLIENT_RANGE // 2:
            raise ValueError(f"{name}: a coordinate outside the exact range of SecAgg+")
        out.append(ints.astype(np.float64))
    return out


def check_exact_setup(context: Context) -> None:
    """Refuse a distributed-noise round whose SecAgg+ parameters would clip or round the release
    (they come from the server; only the exact mapping keeps the sum's guarantee)."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    got = {k: state.get(k) for k in ("clipping_range", "target_range", "mod_range", "max_weight")} if state else {}
    want = {
        "clipping_range": 0.5,
        "target_range": CLIENT_RANGE,
        "mod_range": MODULUS,
        "max_weight": float(CLIENT_RANGE),
    }
    for key, value in want.items():
        if got.get(key) is None or float(got[key]) != float(value):
            raise ConfigError(
                f"secaggplus {key}", "a distributed-noise round needs SecAgg+ to sum this device's integers exactly"
            )


def legacy_fit(msg: Message, context: Context, answer: Answer, answered: list | None = None) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    instruction, keys, secagg_range = TrainInstruction.from_secure_config(dict(fitins.config))
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    exact = _distributed_request(instruction)
    if exact:
        check_exact_setup(context)
    done = answer(instruction, global_state, context)
    reply = done.reply
    if exact:
        vector = exact_vector(reply.update, global_state, keys)
    else:
        vector = secure_vector(
            reply.update,
            global_state,
            keys,
            fits=bool(reply.fits),
            clipping_range=secagg_range,
            max_norm=instruction.client_clip_norm,
        )
    if answered is not None:  # what the masked vector carries: every key, zeros for a decline
        carried = {k: global_state[k] for k in keys}
        if exact:
            carried[COUNT_KEY] = torch.zeros(1, dtype=torch.int64)
        answered.append((done, carried))
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(vector),
        num_examples=1,
        metrics=reply.secure_metrics(),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
