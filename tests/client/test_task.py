"""A client's round without Flower: budgets, write-ahead ledger, resend without new spend."""

import json

import pytest
import torch

from client.ledger import Ledger
from client.task import ClientIdentity, budget_epsilon, run_round
from common.accounting import append_steps, calibrate_noise, epsilon, sample_rate, steps_per_epoch
from common.data import load_client_data
from common.model import instantiate_model, trainable_state


def global_weights(cfg):
    _, labels = load_client_data(cfg, 0)
    return trainable_state(instantiate_model(cfg, len(labels)))


def who(cfg, client_id="0", max_epsilon=None):
    return ClientIdentity(client_id=client_id, partition_id=int(client_id), state_dir=cfg["state_dir"],
                          max_epsilon=max_epsilon)


def expected_round_epsilons(cfg, client_id="0"):
    """ε after rounds 1, 2, ... as the contract defines them (independent of run_round)."""
    n = len(load_client_data(cfg, int(client_id))[0])
    batch = cfg["train"]["batch_size"]
    q, steps = sample_rate(n, batch), steps_per_epoch(n, batch) * cfg["train"]["local_epochs"]
    sigma = calibrate_noise(target_epsilon=cfg["privacy"]["sample"]["epsilon"], delta=1e-5,
                            sample_rate=q, steps=steps * cfg["rounds"])
    return [epsilon([(sigma, q, steps * r)], 1e-5) for r in range(1, cfg["rounds"] + 1)]


def test_trained_round_is_committed_before_reply(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    out = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    assert not out.declined and out.update is not None
    assert set(out.update) == set(weights)
    ledger = Ledger.load(cfg["state_dir"], "0")
    assert ledger.rounds[-1].status == "trained" and ledger.history
    assert out.privacy["history"] == [list(h) for h in ledger.history]
    assert epsilon(ledger.history, 1e-5) == pytest.approx(expected_round_epsilons(cfg)[0], abs=1e-9)
    # Only ε-relevant facts travel: no loss, no example count.
    assert not {"loss", "num-examples", "n"} & set(out.privacy)


def test_repeated_request_resends_without_new_spend(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    first = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    history = Ledger.load(cfg["state_dir"], "0").history
    again = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    assert again.resent and not again.declined
    assert all(torch.equal(first.update[k], again.update[k]) for k in first.update)
    assert Ledger.load(cfg["state_dir"], "0").history == history
    # The same round on other weights must not train (and spend) a second time.
    other = {k: v + 1 for k, v in weights.items()}
    twice = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=other)
    assert twice.declined and twice.update is None
    assert Ledger.load(cfg["state_dir"], "0").history == history
    assert len(Ledger.load(cfg["state_dir"], "0").rounds) == 1


def test_client_budget_declines_and_never_exceeds(fast_cfg):
    probe = fast_cfg("rounds=3")
    eps = expected_round_epsilons(probe)
    cap = (eps[0] + eps[1]) / 2  # room for round 1 only
    cfg = fast_cfg("rounds=3", f"+privacy.sample.client_budgets.0={cap}")
    assert budget_epsilon(cfg, who(cfg)) == cap
    weights = global_weights(cfg)
    outcomes = [run_round(cfg, who(cfg), run_id="r", server_round=r, global_state=weights) for r in (1, 2, 3)]
    assert [o.declined for o in outcomes] == [False, True, True]
    assert outcomes[1].reason == "budget" and outcomes[1].update is None
    summary = outcomes[2].privacy
    assert summary["rounds_participated"] == 1 and summary["rounds_declined"] == 2 and summary["exhausted"]
    assert epsilon(summary["history"], 1e-5) <= cap


def test_device_cap_wins_when_lower(fast_cfg):
    cfg = fast_cfg("+privacy.sample.client_budgets.0=5.0")
    assert budget_epsilon(cfg, who(cfg, max_epsilon=2.0)) == 2.0
    assert budget_epsilon(cfg, who(cfg, max_epsilon=7.0)) == 5.0
    assert budget_epsilon(cfg, who(cfg, client_id="1")) == 8.0
    weights = global_weights(cfg)
    out = run_round(cfg, who(cfg, max_epsilon=1e-3), run_id="r", server_round=1, global_state=weights)
    assert out.declined and out.reason == "budget"
    assert Ledger.load(cfg["state_dir"], "0").history == []


def test_second_run_continues_the_ledger(fast_cfg):
    first = fast_cfg("rounds=2", "privacy.sample.epsilon=3")
    weights = global_weights(first)
    for r in (1, 2):
        run_round(first, who(first), run_id="runA", server_round=r, global_state=weights)
    spent = epsilon(Ledger.load(first["state_dir"], "0").history, 1e-5)
    assert 2.9 <= spent <= 3.0

    second = fast_cfg("rounds=2", "privacy.sample.epsilon=6")
    out = run_round(second, who(second), run_id="runB", server_round=1, global_state=weights)
    ledger = Ledger.load(second["state_dir"], "0")
    assert not out.declined
    assert out.privacy["per_round"][0]["epsilon"] > spent  # rises from where it was
    assert len(ledger.history) == 2  # runA's entry kept, runB's sigma appended
    run_round(second, who(second), run_id="runB", server_round=2, global_state=weights)
    total = epsilon(Ledger.load(second["state_dir"], "0").history, 1e-5)
    assert 5.9 <= total <= 6.0

    # A third run with the same budget has nothing left: it declines and spends nothing.
    third = run_round(second, who(second), run_id="runC", server_round=1, global_state=weights)
    assert third.declined and third.privacy["exhausted"]
    assert epsilon(Ledger.load(second["state_dir"], "0").history, 1e-5) == total


def test_resumed_run_reuses_stored_sigma(fast_cfg):
    cfg = fast_cfg("rounds=3")
    weights = global_weights(cfg)
    run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=weights)
    sigma = Ledger.load(cfg["state_dir"], "0").runs["r"].noise_multiplier
    # A later round of the same run (say after a restart) must not re-calibrate.
    run_round(cfg, who(cfg), run_id="r", server_round=2, global_state=weights)
    history = Ledger.load(cfg["state_dir"], "0").history
    assert len(history) == 1 and history[0][0] == sigma


def test_no_privacy_trains_without_history(fast_cfg):
    cfg = fast_cfg("privacy=none")
    out = run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=global_weights(cfg))
    assert not out.declined and out.update is not None
    assert Ledger.load(cfg["state_dir"], "0").history == []
    json.dumps(out.privacy, allow_nan=False)  # the summary stays valid JSON


def test_history_append_matches_ledger(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=weights)
    one = Ledger.load(cfg["state_dir"], "0")
    run_round(cfg, who(cfg), run_id="r", server_round=2, global_state=weights)
    two = Ledger.load(cfg["state_dir"], "0")
    sigma, q, steps = one.history[0]
    assert two.history == append_steps(one.history, sigma, q, steps)
