"""Runs that share a state directory share each client's ledger (the real server loop and
ClientApp, in process, as `fedpriv simulate` runs them with ``state_dir=``).

Every check on the report is made from outside the code (tests.server.test_simulate_e2e's
``check_report``: ε recomputed with Opacus from the reported history, per-round ε never
decreasing, never above the budget).
"""

from __future__ import annotations

from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.conftest import FAST, compose
from tests.server.test_simulate_e2e import check_report


def _run(tmp_path, name, state, *overrides):
    run_dir = tmp_path / name
    cfg = compose([*FAST, "num_clients=2", *overrides, f"state_dir={state}"], run_dir)
    run_federation(InProcessGrid(2), prepare(cfg), run_dir)
    return check_report(run_dir)


def test_shared_state_dir_continues_ledgers_and_declines_when_spent(task_identity, tmp_path):
    state = tmp_path / "ledgers"
    first = _run(tmp_path, "a", state, "rounds=2", "privacy.sample.epsilon=3")
    second = _run(tmp_path, "b", state, "rounds=2", "privacy.sample.epsilon=6")
    for c1, c2 in zip(first["sample_level"]["clients"], second["sample_level"]["clients"]):
        assert c2["per_round"][0]["epsilon"] > c1["epsilon"]  # never restarts at 0
        assert c2["history"][: len(c1["history"])] == c1["history"]
        assert 5.9 <= c2["epsilon"] <= 6.0
    third = _run(tmp_path, "c", state, "rounds=1", "privacy.sample.epsilon=6")
    for c2, c3 in zip(second["sample_level"]["clients"], third["sample_level"]["clients"]):
        assert c3["exhausted"] and c3["rounds_participated"] == 0
        assert c3["epsilon"] == c2["epsilon"]
    assert third["rounds"][0]["clients_trained"] == 0
