"""A round's messages go out at most a window at a time (server.round.dispatch), through the loop too."""

from __future__ import annotations

import json
from uuid import uuid4

from flwr.app import ConfigRecord, Message, RecordDict

from server.round.dispatch import send_and_receive
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from server.runtime.simulate import message_window
from tests.conftest import FAST, compose


class _Link:
    """Push/pull as Flower's link: a pushed message is answered by the pull after the next
    one, or never for the nodes in ``silent``. Records how many were unanswered at most."""

    def __init__(self, answer, silent=()):
        self.answer, self.silent = answer, set(silent)
        self.stored: dict[str, Message] = {}
        self.ready: list[str] = []
        self.pushed: list[int] = []
        self.most_in_flight = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.stored[msg.metadata.message_id] = msg
            self.pushed.append(msg.metadata.dst_node_id)
            ids.append(msg.metadata.message_id)
        self.most_in_flight = max(self.most_in_flight, len(self.stored))
        return ids

    def pull_messages(self, message_ids):
        done = [i for i in self.ready if i in set(message_ids)]
        self.ready = [
            i for i in self.stored if i not in done and self.stored[i].metadata.dst_node_id not in self.silent
        ]
        replies = [self.answer(self.stored.pop(i)) for i in done]
        return replies


def _echo(msg: Message) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"id": msg.metadata.dst_node_id})}), reply_to=msg)


def _make(node: int) -> Message:
    return Message(RecordDict({"x": ConfigRecord({"n": node})}), dst_node_id=node, message_type="train")


def test_at_most_a_window_in_flight_and_every_node_answered(task_identity):
    link = _Link(_echo)
    replies = send_and_receive(link, range(10, 30), _make, timeout=30, window=3)
    assert sorted(r.content["node"]["id"] for r in replies) == list(range(10, 30))
    assert link.most_in_flight == 3
    assert link.pushed == list(range(10, 30))  # in the given order, each once


def test_the_deadline_leaves_unsent_nodes_missing(task_identity):
    link = _Link(_echo, silent={1})
    replies = send_and_receive(link, [1, 2, 3], _make, timeout=0.5, window=1)
    assert replies == []  # node 1 never answers and holds the only slot
    assert link.pushed == [1]  # 2 and 3 were never asked: missing, as if they had not answered


def test_window_none_is_flowers_send_and_receive(task_identity):
    class AllAtOnce:
        def send_and_receive(self, messages, *, timeout):
            self.got = [m.metadata.dst_node_id for m in messages]
            return [_echo(m) for m in messages]

    grid = AllAtOnce()
    assert len(send_and_receive(grid, [4, 5], _make, timeout=1, window=None)) == 2
    assert grid.got == [4, 5]


class _WindowedGrid(InProcessGrid):
    """The in-process grid behind Flower's push/pull: replies computed by the real ClientApp."""

    def __init__(self, n):
        super().__init__(n)
        self.link = _Link(lambda msg: InProcessGrid.send_and_receive(self, [msg])[0])
        self.push_messages, self.pull_messages = self.link.push_messages, self.link.pull_messages

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("with a window the loop pushes and pulls")


def test_the_loop_keeps_to_its_window(task_identity, tmp_path):
    cfg = compose([*FAST, "num_clients=5", "rounds=1", "node_wait_s=5"], tmp_path / "run")
    grid = _WindowedGrid(5)
    run_federation(grid, prepare(cfg), tmp_path / "run", window=2)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["clients_trained"] == 5 and record["clients_missing"] == 0
    assert grid.link.most_in_flight == 2


def test_message_window_of_simulate(tmp_path):
    assert message_window(compose(["simulation.num_cpus=2"], tmp_path / "a")) == 4  # 2 per worker
    assert (
        message_window(
            compose(
                ["simulation.num_cpus=4", "simulation.cpus_per_client=2", "simulation.in_flight_per_worker=3"],
                tmp_path / "b",
            )
        )
        == 6
    )
    assert message_window(compose(["simulation.in_flight_per_worker=null"], tmp_path / "c")) is None
    assert message_window(compose(["federation.ray_address=auto"], tmp_path / "d")) is None
