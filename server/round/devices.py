"""After a round, the devices evaluate and personalise on their own data (issue 30).

With ``data.client_test_fraction`` > 0 or ``personalize`` other than none, the loop sends
every node one message of type ``evaluate`` after the run's last round (and every
``evaluation.client_every`` rounds) with the global weights; each device evaluates them on
its own held-out part, trains its personal model and keeps both the model and the figures
in its state directory (``client.personal``). The reply carries one flag, checked against
the allow-list (``common.protocol.read_evaluate_reply``): nothing computed from a device's
data reaches the server, and no device's ledger moves.

In simulation the simulated devices' state directories are on this machine, under the
run's ``state_dir``: :func:`collect_simulated` reads their figures from there for the
report, which says where they came from (``common.personal.SOURCE_SIMULATED``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from common.personal import SOURCE_SIMULATED, read_simulated, summary
from common.protocol import EvaluateInstruction, ProtocolError, read_evaluate_reply
from common.rundir import RunDir
from common.storage import atomic_write_json
from server.round.dispatch import send_and_receive

log = logging.getLogger(__name__)


def due(cfg: dict, server_round: int, *, last: int) -> bool:
    """Whether the devices evaluate after ``server_round`` before the run's end (``evaluation.client_every``)."""
    every = int(cfg["evaluation"]["client_every"])
    return every > 0 and server_round % every == 0 and server_round < last


def ask_devices(
    grid: Grid,
    nodes: list[int],
    global_state: dict,
    *,
    run_id: str,
    server_round: int,
    cfg_json: str,
    final: bool,
    timeout: float,
    window: int | None,
) -> dict[str, int]:
    """Send the evaluation message to every node; (counts of) who evaluated, declined or failed."""
    content = EvaluateInstruction(run_id, server_round, cfg_json, final).to_content(global_state)
    replies = send_and_receive(
        grid,
        nodes,
        lambda node: Message(content=content, dst_node_id=node, message_type="evaluate"),
        timeout=timeout,
        window=window,
    )
    counts = {"evaluated": 0, "declined": 0, "failed": 0, "missing": len(nodes) - len(replies)}
    for reply in replies:
        if reply.has_error():
            counts["failed"] += 1
            continue
        try:
            counts["evaluated" if read_evaluate_reply(reply.content) else "declined"] += 1
        except ProtocolError as err:
            log.warning("an evaluation reply was refused: %s", err.reason)
            counts["failed"] += 1
    log.info("after round %d the devices evaluated on their own data: %s", server_round, counts)
    return counts


def collect_simulated(cfg: dict, run_dir: Path, run_id: str, *, server_round: int) -> dict | None:
    """Simulation: the simulated devices' figures of this run's final evaluation, read from
    their state directories, written to ``client_evaluation.json`` (the report reads it, and
    ``fedpriv report`` re-renders from it); None when none of them keeps any (deployment:
    the figures stay on the devices)."""
    state_dir = cfg.get("state_dir")
    rows = read_simulated(state_dir, run_id) if state_dir else []
    rows = [row for row in rows if row.get("round") == server_round]
    if not rows:
        return None
    block = {
        "round": server_round,
        "source": SOURCE_SIMULATED,
        "per_client": [{k: v for k, v in row.items() if k != "round"} for row in rows],
    }
    block["summary"] = summary(block["per_client"])
    atomic_write_json(RunDir(run_dir).client_evaluation, block)
    return block
