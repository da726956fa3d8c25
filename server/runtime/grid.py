"""An in-process Grid: nodes that run the real ClientApp in this process, one after another.

For what drives the real round loop (``server.round.loop.run_federation``: update checks,
mechanism, report, checkpoints) without Ray or a SuperLink — the tests of what leaves a
device, the tools that need a small real run, and ``benchmarks/tune.py``. The ClientApp
is loaded by its component string (``server.runtime.pinning.CLIENT_APP``), as Flower loads
it, so ``server/`` still imports no client code. A message is deep-copied on the way in,
as if serialised; a raised exception becomes an error reply whose reason is exactly the
text Flower builds (``flwr/supernode/runtime/run_clientapp.py`` and the simulation's
``vce_api``: ``str(type(ex)) + ":<'" + str(ex) + "'>"``).

Flower builds a Message only inside a run, so the caller sets
``flwr.supercore.task_identity.TaskIdentity`` (server node 1 of run ``RUN_ID``) first;
:func:`as_server_of_run` does that.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from common.protocol import simulation_env

RUN_ID = 7


def as_server_of_run(run_id: int = RUN_ID) -> None:
    """Let this process build Flower Messages as the server node (1) of ``run_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1


class InProcessGrid:
    """``node_configs``: node id -> its node config (a device in deployment: its own
    state-dir and privacy policy), or a number n of simulated nodes (node ``c`` is partition
    ``c`` of n, keeping its ledger under the run's ``state_dir``, as in ``fedpriv simulate``)."""

    class run:  # noqa: N801 - what server.round.secagg reads: grid.run.run_id
        run_id = RUN_ID

    def __init__(self, node_configs: int | Mapping[int, Mapping]):
        from flwr.supercore.object_ref import load_app

        from server.runtime.pinning import CLIENT_APP, ROOT

        self.simulated = isinstance(node_configs, int)
        if isinstance(node_configs, int):
            node_configs = {c: {"partition-id": c, "num-partitions": node_configs} for c in range(node_configs)}
        self.app = load_app(CLIENT_APP, ValueError, project_dir=ROOT)
        self.contexts = {
            n: Context(run_id=RUN_ID, node_id=n, node_config=dict(c), state=RecordDict(), run_config={})
            for n, c in node_configs.items()
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            try:
                with simulation_env() if self.simulated else contextlib.nullcontext():
                    replies.append(self.app(message=msg, context=self.contexts[msg.metadata.dst_node_id]))
            except Exception as ex:
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
        return replies
