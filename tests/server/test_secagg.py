"""SecAgg+ from fedpriv's loop over an in-process Grid: Flower's workflow (server) and mod (client).

The grid below delivers every message to an in-process client that runs fedpriv's own
SecAgg+ handler (``client.secagg.secagg_train``: Flower's ``secaggplus_mod`` around the
legacy fit) with a stand-in for training, and keeps every reply the server receives.
"""

import copy
import dataclasses
import math
import tempfile

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import Answered
from client.privacy.node_config import ClientIdentity
from client.secagg import secagg_train
from common.privacy.mechanism import ClientLevelDP, clip_update
from common.protocol import TrainInstruction, TrainReply
from common.secagg_graph import neighbourhood
from server.round.aggregate import aggregate
from server.round.secagg import secagg_round
from tests.conftest import config_group

C = 1.0
SETTINGS = {
    "num_shares": 1.0,
    "reconstruction_threshold": 0.67,
    "corrupt_fraction": 0.1,
    "dropout_fraction": 0.1,
    "quantization_range": 2**22,
    "modulus_range": 2**32,
    "clipping_range": 8.0,
}
SHAPES = {"w": (40, 30), "b": (30,)}
GLOBAL = {k: torch.zeros(s) for k, s in SHAPES.items()}


class InProcessGrid:
    """A Grid whose nodes are in-process SecAgg+ clients; ``drop`` = {node: stage it stops answering at}."""

    def __init__(self, updates, declined=(), drop=None, extra=None, ids=None, crash=()):
        self.updates, self.declined, self.drop = updates, set(declined), dict(drop or {})
        self.extra = dict(extra or {})  # node -> extra plain metrics it (mis)sends
        self.ids = dict(ids or {})  # node -> the client id it claims (default: its node id)
        self.crash = set(crash)  # nodes whose training raises
        self.contexts = {
            n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in updates
        }
        self.received: list[tuple[str, Message]] = []  # (stage, reply) as the server got them
        self.state_dir = tempfile.mkdtemp(prefix="fedpriv-secagg-test-")  # the devices' transparency logs

    def answer(self, instruction, global_state, context):
        node = context.node_id
        reply = dict(
            client_id=self.ids.get(node, str(node)),
            server_round=instruction.server_round,
            declined=node in self.declined,
            reason="budget" if node in self.declined else "",
            report={},
        )
        if node in self.crash:
            raise RuntimeError("training failed on the device (RuntimeError)")
        cls = _Tampered.extra(self.extra[node]) if node in self.extra else TrainReply
        who = ClientIdentity(reply["client_id"], 0, self.state_dir)
        if node in self.declined:
            return Answered(cls(**reply), who, instruction.run_id, "declined", None)
        clipped = clip_update(self.updates[node], instruction.client_clip_norm)
        return Answered(cls(**reply, update=clipped.update, fits=clipped.fits), who, instruction.run_id, "sent", None)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # as if serialised: the workflow shares one content among nodes
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                continue  # sampled, but never connected: no reply at all
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self.drop.get(node) == stage:
                self.drop[node] = "gone"
            if self.drop.get(node) == "gone":
                continue  # the node has dropped out: no reply
            try:
                reply = secagg_train(msg, self.contexts[node], self.answer)
            except Exception as ex:  # as Flower does: an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(ex)), reply_to=msg)
            self.received.append((stage, reply))
            replies.append(reply)
        return replies


class _Tampered(TrainReply):
    """A reply whose plain part carries what the protocol does not."""

    @staticmethod
    def extra(fields):
        return type("Tampered", (_Tampered,), {"fields": dict(fields)})

    def secure_metrics(self):
        return {**super().secure_metrics(), **self.fields}


def random_updates(nodes, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: {k: torch.randn(s, generator=gen) * scale * (1 + i) for k, s in SHAPES.items()} for i, n in enumerate(nodes)
    }


def run_round(grid, nodes, clip=C, server_round=1, settings=SETTINGS):
    instruction = TrainInstruction("r", server_round, "{}", client_clip_norm=clip)
    return secagg_round(
        grid,
        nodes,
        GLOBAL,
        instruction,
        server_round=server_round,
        settings=settings,
        clipping_range=clip,
        timeout=None,
        run_id=7,
    )


def plain_sum(updates, nodes, clip=C):
    return {k: sum(clip_update(updates[n], clip).update[k].double() for n in nodes) for k in SHAPES}


def max_error(total, expected):
    return max(float((total[k] - expected[k]).abs().max()) for k in SHAPES)


@pytest.fixture
def nodes():
    return [11, 12, 13, 14]


def test_server_sees_masked_vectors_and_the_unmasked_sum_is_the_clipped_sum(task_identity, nodes):
    updates = random_updates(nodes, scale=0.02)  # norms ~0.7, 1.4, 2.1, 2.8: one fits under C
    grid = InProcessGrid(updates)
    result = run_round(grid, nodes)
    assert result.secure_sum is not None and sorted(result.trained) == [str(n) for n in nodes]
    step = 2 * C / SETTINGS["quantization_range"]
    assert max_error(result.secure_sum.total, plain_sum(updates, nodes)) <= len(nodes) * step
    fits = sum(clip_update(updates[n], C).fits for n in nodes)
    assert 0 < fits < len(nodes) and result.secure_sum.fits == fits  # the bits were summed securely

    masked = [reply for stage, reply in grid.received if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(masked) == len(nodes)
    for reply in masked:
        node = reply.metadata.src_node_id
        clipped = clip_update(updates[node], C).update
        # No plain array leaves the client: the mod cleared them.
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        assert "fits" not in reply.content.config_records["fitres.metrics"]
        vector = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        # Read the masked vector as if it were the quantised update: it is not the update.
        as_update = dequantize(vector[1:3], C, SETTINGS["quantization_range"])
        err = max(float(np.abs(a.reshape(SHAPES[k]) - clipped[k].numpy()).max()) for a, k in zip(as_update, SHAPES))
        assert err > 100 * step


def test_a_client_that_drops_after_sharing_its_masks_is_recovered(task_identity, nodes):
    updates = random_updates(nodes, scale=0.01)
    grid = InProcessGrid(updates, drop={13: Stage.COLLECT_MASKED_VECTORS})
    result = run_round(grid, nodes)
    survivors = [n for n in nodes if n != 13]
    assert result.secure_sum is not None and sorted(result.trained) == [str(n) for n in survivors]
    step = 2 * C / SETTINGS["quantization_range"]
    assert max_error(result.secure_sum.total, plain_sum(updates, survivors)) <= len(survivors) * step
    # Its pairwise masks were removed with the survivors' shares of its key; its own update is absent.


def test_too_many_drops_halt_the_round_without_revealing_anything(task_identity, nodes):
    grid = InProcessGrid(
        random_updates(nodes), drop={12: Stage.COLLECT_MASKED_VECTORS, 13: Stage.COLLECT_MASKED_VECTORS}
    )
    result = run_round(grid, nodes)  # threshold 3 of 4 shares: two drops are too many
    assert result.secure_sum is None and result.trained == []
    # The halt is the round's, not a client's: it is no entry of `failed` (clients_failed).
    assert "halted" in result.secure_error and result.failed == {}


def test_declined_client_masks_zeros_and_noise_goes_on_the_secure_sum(task_identity, nodes):
    updates = random_updates(nodes, scale=0.001)
    grid = InProcessGrid(updates, declined={14})
    result = run_round(grid, nodes)
    assert "14" in result.declined and sorted(result.trained) == ["11", "12", "13"]
    step = 2 * C / SETTINGS["quantization_range"]
    assert max_error(result.secure_sum.total, plain_sum(updates, [11, 12, 13])) <= 4 * step
    dp = ClientLevelDP(
        {
            "rounds": 3,
            "num_clients": 4,
            "secagg": True,
            "privacy": {
                "client": {
                    **config_group("privacy", "client")["client"],
                    "clipping": "fixed",
                    "clipping_norm": C,
                    "noise_multiplier": 1.0,
                    "epsilon": 50.0,
                    "delta": 1e-3,
                }
            },
        }
    )
    new = aggregate(GLOBAL, result, server_lr=1.0, n_planned=4, client_dp=dp)
    std = float(torch.cat([v.flatten() for v in new.values()]).std())
    assert math.isclose(std, 1.0 * C / 4, rel_tol=0.15)  # 1230 coordinates, sigma*C/n


# ------------------------------------------------------------------ one reply parser for both paths
# The SecAgg+ replies pass the same checks as plain ones (server.round.aggregate.collect): the
# allow-list of plain metrics, the round tag, one reply per client id, and every sampled
# node accounted for as trained, declined, rejected, failed or missing.


def test_secagg_reply_with_an_extra_plain_metric_is_rejected(task_identity, nodes):
    grid = InProcessGrid(random_updates(nodes, scale=0.01), extra={12: {"loss": 0.25}})
    result = run_round(grid, nodes)
    assert "loss" in result.rejected["12"]
    assert sorted(result.trained) == ["11", "13", "14"]
    assert result.secure_sum.senders == 4  # its masked vector is in the sum: the sum check bounds it


def test_secagg_reply_with_the_fits_bit_in_plain_text_is_rejected(task_identity, nodes):
    # fits is summed securely under SecAgg; sent in plain text it would reveal one client's bit.
    grid = InProcessGrid(random_updates(nodes, scale=0.01), extra={13: {"fits": 1}})
    result = run_round(grid, nodes)
    assert "fits" in result.rejected["13"] and "13" not in result.trained


def test_secagg_second_reply_for_one_client_id_is_rejected(task_identity, nodes):
    grid = InProcessGrid(random_updates(nodes, scale=0.01), ids={12: "11"})
    result = run_round(grid, nodes)
    assert sorted(result.trained) == ["11", "13", "14"]
    assert list(result.rejected.values()) == ["a second reply for this client id"]


def test_secagg_reply_for_another_round_is_rejected(task_identity, nodes):
    grid = InProcessGrid(random_updates(nodes, scale=0.01))
    original = grid.answer

    def stale(instruction, global_state, context):
        reply = original(instruction, global_state, context)
        if context.node_id != 14:
            return reply
        return dataclasses.replace(reply, reply=dataclasses.replace(reply.reply, server_round=1))

    grid.answer = stale
    result = run_round(grid, nodes, server_round=2)
    assert "round" in result.rejected["14"] and sorted(result.trained) == ["11", "12", "13"]


def test_secagg_dropped_and_failed_nodes_are_named(task_identity):
    nodes = [11, 12, 13, 14, 16, 17]
    grid = InProcessGrid(
        random_updates(nodes, scale=0.01),
        crash={12},
        drop={13: Stage.COLLECT_MASKED_VECTORS, 16: Stage.COLLECT_MASKED_VECTORS},
    )
    result = run_round(grid, nodes, settings={**SETTINGS, "reconstruction_threshold": 3})
    assert result.secure_sum is not None and sorted(result.trained) == ["11", "14", "17"]
    assert result.missing == [13, 16] and result.failed_nodes == [12]
    assert list(result.failed) == ["node 12"] and "RuntimeError" in result.failed["node 12"]
    assert result.node_clients == {11: "11", 14: "14", 17: "17"}


def test_a_node_that_never_answers_is_missing(task_identity, nodes):
    # Flower's workflow halts when a node is silent from the first stage (its secrets were
    # never shared); the loop's "reply never arrived" caveat still needs its node id.
    result = run_round(InProcessGrid(random_updates(nodes, scale=0.01)), [*nodes, 15])
    assert 15 in result.missing and result.failed_nodes == []


def test_a_halted_round_still_keeps_what_the_replies_said(task_identity, nodes):
    grid = InProcessGrid(
        random_updates(nodes), drop={12: Stage.COLLECT_MASKED_VECTORS, 13: Stage.COLLECT_MASKED_VECTORS}
    )
    result = run_round(grid, nodes)
    assert result.secure_sum is None and result.trained == []
    assert result.missing == [12, 13]
    assert sorted(result.privacy) == ["11", "14"]  # they trained: their ledgers' spend is reported


# ------------------------------------------------------------------ the neighbourhood Flower is handed
# workflow_for hands Flower num_shares as a fraction of the sampled clients (never an int, which
# Flower checks against modulus_range / quantization_range); its setup stage must turn it back into
# exactly the count fedpriv chose, and send that count and the threshold to every client.


class _SetupOnly:
    """A Grid that keeps the setup stage's messages and answers none (the workflow then halts)."""

    def __init__(self):
        self.configs = []

    def send_and_receive(self, messages, *, timeout=None):
        self.configs += [m.content.config_records[RECORD_KEY_CONFIGS] for m in messages]
        return []


def setup_sent(nodes, settings):
    grid = _SetupOnly()
    result = run_round(grid, nodes, settings=settings)
    assert result.secure_sum is None  # nobody answered: nothing revealed
    assert len(grid.configs) == len(nodes)
    return {(c[Key.SHARE_NUMBER], c[Key.THRESHOLD]) for c in grid.configs}


AUTO = {**SETTINGS, "num_shares": "auto", "reconstruction_threshold": "auto"}


@pytest.mark.parametrize("n", [3, 10, 31, 100])
def test_auto_neighbourhood_reaches_every_client_as_chosen(task_identity, n):
    graph = neighbourhood(n, SETTINGS["corrupt_fraction"], SETTINGS["dropout_fraction"])
    assert setup_sent(list(range(1, n + 1)), AUTO) == {(graph.num_shares, graph.threshold)}


@pytest.mark.parametrize(
    "shares, threshold, sent",
    [(1.0, 0.67, (10, 7)), (0.5, 0.6, (5, 3)), (5, 3, (5, 3)), (4, 3, (5, 3)), (1, 2, (10, 2))],
)
def test_explicit_shares_and_thresholds_still_work(task_identity, shares, threshold, sent):
    # An even int is bumped to the next odd count (the client plus k/2 neighbours each side), and
    # the clients are told that count: Flower's int path told them the even one.
    settings = {**SETTINGS, "num_shares": shares, "reconstruction_threshold": threshold}
    assert setup_sent(list(range(1, 11)), settings) == {sent}


def test_auto_round_over_a_sparse_graph_recovers_dropped_clients(task_identity):
    nodes = list(range(101, 131))  # 30 clients: 6 neighbours each, threshold 5
    graph = neighbourhood(30, SETTINGS["corrupt_fraction"], SETTINGS["dropout_fraction"])
    assert not graph.complete and graph.num_shares < len(nodes)
    updates = random_updates(nodes, scale=0.001)
    dropped = {105: Stage.COLLECT_MASKED_VECTORS, 120: Stage.COLLECT_MASKED_VECTORS}
    result = run_round(InProcessGrid(updates, drop=dropped), nodes, settings=AUTO)
    survivors = [n for n in nodes if n not in dropped]
    assert result.secure_sum is not None and sorted(result.trained) == sorted(str(n) for n in survivors)
    step = 2 * C / SETTINGS["quantization_range"]
    assert max_error(result.secure_sum.total, plain_sum(updates, survivors)) <= len(survivors) * step
