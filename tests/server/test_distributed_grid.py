"""Distributed noise through the real server loop, the real SecAgg+ workflow and real ClientApps.

In process (``server.runtime.grid.InProcessGrid``): the prototype release and head steps as
exact integer sums with one share of Skellam noise per client; the report's ε recomputed
here from the report alone with the papers' formulas (tests/common/test_discrete.py); a sum
with fewer than n_min shares is never released; a device may refuse distributed noise.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from client.app import app
from client.privacy import transparency
from client.privacy.ledger import Ledger
from client.privacy.policy import REASON_DISTRIBUTED, REASON_DISTRIBUTED_PLAIN
from common.protocol import TrainInstruction, TrainReply
from server.round.checkpoint import Manifest, load_round
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.common.test_discrete import reference_epsilon
from tests.conftest import FAST, compose, server_of_run

DISTRIBUTED = [
    "model.pooling=mean",
    "num_clients=4",
    "node_wait_s=5",
    "secagg=true",
    "privacy.sample.noise=distributed",
    "privacy.sample.delta=1e-3",
]


def _run(tmp_path, *overrides):
    cfg = compose(
        [*(o for o in FAST if not o.startswith(("recipe=", "train."))), *DISTRIBUTED, *overrides], tmp_path / "run"
    )
    run_dir = tmp_path / "run"
    report = run_federation(InProcessGrid(int(cfg["num_clients"])), prepare(cfg), run_dir, progress_bar=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    manifest = Manifest.load(run_dir)
    states = [load_round(run_dir, manifest, r) for r in range(len(metrics) + 1)]
    return cfg, report, metrics, states


@pytest.mark.parametrize("rate", [1.0, 0.5])  # full-batch head steps (the default), and Poisson-sampled ones
def test_distributed_rounds_release_sums_and_the_report_recomputes_both_epsilons(task_identity, tmp_path, rate):
    cfg, report, metrics, states = _run(
        tmp_path, "rounds=3", "privacy.sample.epsilon=4", f"privacy.sample.distributed.sample_rate={rate}"
    )
    assert [m["clients_trained"] for m in metrics] == [4, 4, 4] and not any(m["skipped"] for m in metrics)
    assert not torch.equal(states[0]["classifier.weight"], states[1]["classifier.weight"])  # prototypes
    assert not torch.equal(states[1]["classifier.weight"], states[2]["classifier.weight"])  # a head step

    sample = report["sample_level"]
    assert sample["noise"] == "distributed"
    dist = sample["distributed"]
    assert dist["mechanism"] == "skellam" and dist["n_min"] == 4 and len(dist["assumptions"]) == 3
    for client in sample["clients"]:
        discrete = client["discrete"]
        assert sum(e["steps"] for e in discrete) == 3 and {e["n_min"] for e in discrete} == {4}
        assert [e["q"] for e in discrete] == [1.0, rate]  # the prototype release, then the head steps
        eps, local = reference_epsilon(discrete, 1e-3), reference_epsilon(discrete, 1e-3, local=True)
        assert client["epsilon"] == pytest.approx(eps, rel=1e-9) and client["epsilon"] <= 4.0
        assert client["epsilon_local"] == pytest.approx(local, rel=1e-9) and local > client["epsilon"]
        # history ends with the releases' Gaussian equivalents: Opacus on it is a lower bound.
        assert client["history"][-len(discrete) :] == [
            [(e["mu"] ** 0.5) / e["l2"], e["q"], e["steps"]] for e in discrete
        ]
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in client["history"]]
        assert acc.get_epsilon(1e-3) <= client["epsilon"]
        assert [p["releases"] for p in client["per_round"]] == [1, 2, 3]
        last = client["per_round"][-1]
        assert last["epsilon"] == client["epsilon"] and last["epsilon_local"] == client["epsilon_local"]

    lines = transparency.read(cfg["state_dir"], "0")
    assert [line["event"] for line in lines] == ["sent"] * 3
    for line in lines:
        assert line["masked"] and line["noise_share"]["n_min"] == 4
        assert line["noise_share"]["variance"] == pytest.approx(line["noise_share"]["sum_variance"] / 4)
        assert line["epsilon_local"] >= line["epsilon_after"]
        assert "fedpriv.count" in line["tensors"]
    ledger = Ledger.load(cfg["state_dir"], "0")
    assert ledger.history == [] and sum(e.steps for e in ledger.discrete) == 3


def test_fewer_than_n_min_shares_release_nothing_but_the_ledgers_are_charged(task_identity, tmp_path):
    # Client 0's own cap makes it decline every round: 3 shares in each sum, n_min = 4.
    cfg, report, metrics, states = _run(
        tmp_path, "rounds=2", "privacy.sample.distributed.n_min=4", "+privacy.sample.client_budgets.0=0.001"
    )
    assert all(m["skipped"] and "n_min=4" in m["secagg_error"] for m in metrics)
    assert all(torch.equal(states[0][k], states[-1][k]) for k in states[0])  # the model never moved
    assert Ledger.load(cfg["state_dir"], "0").discrete == []
    charged = Ledger.load(cfg["state_dir"], "1")
    assert sum(e.steps for e in charged.discrete) == 2  # conservative: the shares left the device


def _message(cfg: dict, state: dict, node_config: dict) -> Message:
    instruction = TrainInstruction("run-d", 1, json.dumps(cfg))
    with server_of_run():
        msg = Message(content=instruction.to_content(state), dst_node_id=1, message_type="train")
        context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return app(message=msg, context=context)


def test_a_device_may_refuse_distributed_noise_and_never_sends_a_share_in_the_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPRIV_SIMULATION", raising=False)
    cfg = compose([*(o for o in FAST if not o.startswith(("recipe=", "train."))), *DISTRIBUTED], tmp_path / "run")
    prepared = prepare(cfg)
    state = {k: v for k, v in prepared.model.state_dict().items() if k.startswith("classifier.")}
    node = {"state-dir": str(tmp_path / "device"), "client-id": "dev", "partition-id": 0, "max-delta": 1e-2}
    refused = TrainReply.from_content(_message(cfg, state, {**node, "allow-distributed-noise": "false"}).content)
    assert refused.declined and refused.reason == REASON_DISTRIBUTED and refused.arrays is None
    # A plain (not SecAgg+) request for distributed noise: its share would leave alone.
    plain = TrainReply.from_content(_message(cfg, state, node).content)
    assert plain.declined and plain.reason == REASON_DISTRIBUTED_PLAIN and plain.arrays is None
    assert not Ledger.load(tmp_path / "device", "dev").rounds
