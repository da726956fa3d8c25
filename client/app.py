"""The fedpriv ClientApp: a thin Flower handler around ``client.task.run_round``.

Message contract (server → client, ``train``): ``arrays`` = the global trainable
weights; ``config`` = {``run-id``, ``server-round``, ``fedpriv-config`` (the resolved
run config as JSON)}. Reply: ``arrays`` = the update (local − global) unless the
client declined; ``metrics`` = {``declined``, ``server-round``}; ``privacy`` =
{``client-id``, ``reason``, ``report`` (the client's ledger summary as JSON)}.
Nothing else leaves the client: no example count, no training loss.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import release_memory
from client.node_config import node_identity
from client.task import ClientIdentity, run_round

app = ClientApp()
logging.getLogger("flwr").propagate = False


def identity(context: Context, cfg: dict) -> ClientIdentity:
    """This client's identity and own settings, from its node config (client.node_config)."""
    return node_identity(context.node_config, cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = json.loads(str(config["fedpriv-config"]))
    who = identity(context, cfg)
    server_round = int(config["server-round"])
    try:
        outcome = run_round(
            cfg, who,
            run_id=str(config["run-id"]),
            server_round=server_round,
            global_state=msg.content["arrays"].to_torch_state_dict(),
        )
    finally:
        release_memory()  # an idle device holds no GPU cache between rounds
    content = RecordDict({
        "metrics": MetricRecord({"declined": int(outcome.declined), "server-round": server_round}),
        "privacy": ConfigRecord({
            "client-id": who.client_id,
            "reason": outcome.reason,
            "report": json.dumps(outcome.privacy),
        }),
    })
    if outcome.update is not None:
        content["arrays"] = ArrayRecord(torch_state_dict=outcome.update)
    return Message(content=content, reply_to=msg)
