"""Client-level DP and SecAgg+ runs through the real server loop and ClientApp (in
process, as `fedpriv simulate` runs them), checked from outside."""

import json
import math

import pytest
from opacus.accountants import RDPAccountant

from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.conftest import FAST, compose, run_fedpriv
from tests.server.test_simulate_e2e import check_report


def rdp_epsilon(history, delta):
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta) if history else 0.0


def simulate(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    cfg = compose([*FAST, *overrides], run_dir)
    run_federation(InProcessGrid(int(cfg["num_clients"])), prepare(cfg), run_dir)
    return run_dir


@pytest.mark.e2e  # starts a process
def test_both_levels_with_secagg_four_clients_three_rounds(task_identity, tmp_path):
    run_dir = simulate(tmp_path, "run", "num_clients=4", "rounds=3", "privacy=both", "secagg=true")
    report = check_report(run_dir)  # the sample level, as before
    assert report["secure_aggregation"] is True
    assert report["sample_level"]["enabled"] and len(report["sample_level"]["clients"]) == 4
    level = report["client_level"]
    assert level["enabled"] and level["unit"] == "all data of one client"
    eps = [p["epsilon"] for p in level["per_round"]]
    assert [p["round"] for p in level["per_round"]] == [1, 2, 3]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps[0] < eps[1] < eps[2] <= level["budget_epsilon"]
    assert level["history"] == [[level["noise_multiplier"], 1.0, 3]]
    assert rdp_epsilon(level["history"], level["delta"]) == pytest.approx(level["epsilon"], abs=1e-9)
    assert any("amplification" in a for a in level["assumptions"])
    assert [r["clients_trained"] for r in report["rounds"]] == [4, 4, 4]
    text = (run_dir / "privacy_report.md").read_text()
    assert "one training example of one client" in text and "all data of one client" in text
    # `fedpriv report` re-renders the same report, client level included, from the run's files.
    (run_dir / "privacy_report.json").unlink()
    proc = run_fedpriv(["report", str(run_dir)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "privacy_report.json").read_text()) == report


def test_client_level_budget_stops_the_run_cleanly(task_identity, tmp_path):
    # sigma = 1 is given; the budget lies between the ε of one and of two rounds.
    e1, e2 = (rdp_epsilon([(1.0, 1.0, r)], 1e-3) for r in (1, 2))
    budget = (e1 + e2) / 2
    run_dir = simulate(
        tmp_path,
        "run",
        "num_clients=2",
        "rounds=3",
        "privacy=client",
        "privacy.client.noise_multiplier=1.0",
        f"privacy.client.epsilon={budget}",
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1]  # round 2 would have passed the budget
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert sorted(int(r) for r in manifest["rounds"]) == [0, 1]  # the last model is kept
    assert (run_dir / "checkpoints" / manifest["rounds"]["1"]["file"]).exists()
    report = json.loads((run_dir / "privacy_report.json").read_text())
    level = report["client_level"]
    assert level["stopped"]["round"] == 2 and "privacy.client.epsilon" in level["stopped"]["reason"]
    assert level["epsilon"] == pytest.approx(e1) and level["epsilon"] <= budget
    assert [p["round"] for p in level["per_round"]] == [1]
    assert not report["sample_level"]["enabled"] and len(report["rounds"]) == 1
    assert "stopped early" in (run_dir / "privacy_report.md").read_text()
