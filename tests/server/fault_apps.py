"""ClientApps that misbehave on purpose, loaded by component string like the real one.

Partition 1 sends a NaN update in round 1 and dies mid-round 2 (the process exits
without replying); every other client, and partition 1 from round 3 on, is the real
ClientApp.
"""

import os

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import train as real_train

faulty = ClientApp()


@faulty.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    if int(context.node_config["partition-id"]) == 1:
        if server_round == 2:
            os._exit(1)  # killed mid-round: no reply, no error message
        if server_round == 1:
            reply = real_train(msg, context)
            poisoned = {
                k: torch.full_like(v, float("nan")) for k, v in reply.content["arrays"].to_torch_state_dict().items()
            }
            reply.content["arrays"] = ArrayRecord(torch_state_dict=poisoned)
            return reply
    return real_train(msg, context)
