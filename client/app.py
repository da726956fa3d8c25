"""The fedpriv ClientApp: a thin Flower handler around ``client.task.run_round``.

Message contract (server → client, ``train``): ``arrays`` = the global trainable
weights; ``config`` = {``run-id``, ``server-round``, ``fedpriv-config`` (the resolved
run config as JSON)}. Reply: ``arrays`` = the update (local − global) unless the
client declined; ``metrics`` = {``declined``, ``server-round``, and ``fits`` with client-level DP}; ``privacy`` =
{``client-id``, ``reason``, ``report`` (the client's ledger summary as JSON)}.
Nothing else leaves the client: no example count, no training loss.

Client-level DP: the config also holds ``client-clip-norm`` (C); the update is clipped
to it and ``fits`` says whether it fit unclipped (adaptive clipping's bit). SecAgg+
rounds arrive as Flower's legacy SecAgg+ messages: see ``client/secagg.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import release_memory
from client.dp_train import clip_update
from client.node_config import node_identity
from client.secagg import is_secagg, secagg_train
from client.task import ClientIdentity, run_round

app = ClientApp()
logging.getLogger("flwr").propagate = False


def identity(context: Context, cfg: dict) -> ClientIdentity:
    """This client's identity and own settings, from its node config (client.node_config)."""
    return node_identity(context.node_config, cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secagg(msg):  # a SecAgg+ round: Flower's mod drives the stages (client/secagg.py)
        return secagg_train(msg, context, answer)
    update, metrics, privacy = answer(msg.content["config"], msg.content["arrays"].to_torch_state_dict(), context)
    content = RecordDict({"metrics": MetricRecord(metrics), "privacy": ConfigRecord(privacy)})
    if update is not None:
        content["arrays"] = ArrayRecord(torch_state_dict=update)
    return Message(content=content, reply_to=msg)


def answer(config: Mapping, global_state: dict, context: Context) -> tuple[dict | None, dict, dict]:
    """(update or None, metrics, privacy) for one training request, plain or SecAgg+.

    With client-level DP (``client-clip-norm`` in the config) the update is clipped to
    that norm here, after the ledger committed the unclipped reply: clipping is a
    deterministic post-processing, so a resent round clips the kept reply identically.
    """
    cfg = json.loads(str(config["fedpriv-config"]))
    who = identity(context, cfg)
    server_round = int(config["server-round"])
    try:
        outcome = run_round(cfg, who, run_id=str(config["run-id"]), server_round=server_round,
                            global_state=global_state)
    finally:
        release_memory()  # an idle device holds no GPU cache between rounds
    metrics = {"declined": int(outcome.declined), "server-round": server_round}
    update = outcome.update
    clip = config.get("client-clip-norm")
    if update is not None and clip is not None:
        clipped = clip_update(update, float(clip))
        update = clipped.update
        metrics["fits"] = int(clipped.fits)
    privacy = {"client-id": who.client_id, "reason": outcome.reason, "report": json.dumps(outcome.privacy)}
    return update, metrics, privacy
