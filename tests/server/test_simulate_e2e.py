"""End-to-end `fedpriv simulate` runs (Flower's simulation runtime, Ray on loopback).

Every check on the report is made from outside the code: ε recomputed with Opacus
from the reported history, per-round ε never decreasing, never above the budget.
"""

import json
import re
import subprocess
from pathlib import Path

import psutil
import pytest
from opacus.accountants import RDPAccountant

from tests.conftest import FAST, ONE_ACTOR, compose, run_fedpriv

pytestmark = pytest.mark.e2e


def simulate(tmp_path: Path, name: str, *overrides: str) -> Path:
    return simulated(tmp_path, name, *overrides)[0]


def simulated(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    """(run directory, the finished `fedpriv simulate`) of a run that succeeded."""
    run_dir = tmp_path / name
    rounds = [] if any(o.startswith("rounds=") for o in overrides) else ["rounds=3"]  # not the demo's default
    proc = run_fedpriv(
        ["simulate", *FAST, ONE_ACTOR, "num_clients=2", *rounds, f"hydra.run.dir={run_dir}", *overrides], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def summary_table(stdout: str) -> dict[str, str]:
    """The rows of the summary table (server.runtime.summary) that ends ``stdout``; folded cells joined."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "fedpriv run")
    assert lines[-1].startswith("└"), lines[-3:]  # nothing after the table
    rows: dict[str, str] = {}
    for line in lines[start + 2 : -1]:
        label, value = (cell.strip() for cell in line.strip().strip("│").split("│"))
        if label:
            rows[label] = value
        else:
            rows[list(rows)[-1]] += value
    return rows


def check_report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["schema_version"] == 1
    sample = report["sample_level"]
    for client in sample["clients"]:
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in client["history"]]
        recomputed = acc.get_epsilon(sample["delta"]) if client["history"] else 0.0
        assert abs(recomputed - client["epsilon"]) <= 1e-6
        per_round = [r["epsilon"] for r in client["per_round"]]
        assert per_round == sorted(per_round)
        assert client["epsilon"] <= client["budget_epsilon"] + 1e-9
        assert client["steps"] == sum(h[2] for h in client["history"])
    return report


def test_two_clients_two_rounds_with_a_lower_client_budget(tmp_path):
    # Client 1 may spend a third of the run's budget: it trains early, then declines.
    run_dir, proc = simulated(tmp_path, "run", "rounds=3", "+privacy.sample.client_budgets.1=3.0")
    report = check_report(run_dir)
    # A quiet terminal (server.runtime.terminal): no third-party noise, the summary table printed last.
    for noise in ("DEPRECATED", "FutureWarning", "Manually terminating"):
        assert noise not in proc.stdout + proc.stderr, noise
    summary = summary_table(proc.stdout)
    # Flower's simulation runtime (server/runtime/superlink.py): its SuperLink was stopped by its pid.
    cli_log = (run_dir / "cli.log").read_text()
    link_pid = int(re.search(r"simulation SuperLink pid (\d+)", cli_log).group(1))
    assert not psutil.pid_exists(link_pid) or psutil.Process(link_pid).status() == psutil.STATUS_ZOMBIE
    assert "Starting Flower SuperLink" in cli_log  # its log, appended to the run's cli.log
    for name in (
        "privacy_report.json",
        "privacy_report.md",
        "privacy_report.html",
        "clients_reported.json",
        "plots/epsilon_per_round.png",
        "plots/accuracy_per_round.png",
        ".hydra/config.yaml",
        "checkpoints/manifest.json",
        "clients/0/ledger.json",
        "clients/1/ledger.json",
    ):
        assert (run_dir / name).exists(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3]

    clients = {c["client_id"]: c for c in report["sample_level"]["clients"]}
    assert clients["0"]["rounds_participated"] == 3 and not clients["0"]["exhausted"]
    assert 7.9 <= clients["0"]["epsilon"] <= 8.0  # sigma was calibrated to spend the run's budget
    assert clients["1"]["budget_epsilon"] == 3.0
    assert clients["1"]["rounds_declined"] >= 1 and clients["1"]["exhausted"]
    assert clients["1"]["epsilon"] <= 3.0
    assert sum(m["clients_declined"] for m in lines) == clients["1"]["rounds_declined"]
    assert summary["rounds"] == "3 of 3" and summary["report"] == str(run_dir / "privacy_report.md")
    assert summary["declines"] == str(clients["1"]["rounds_declined"]) and summary["rejections"] == "0"
    assert summary["lowest client ε"] == f"{clients['1']['epsilon']:.3f} of 3.000 (client 1)"
    assert summary["final accuracy"] == f"{lines[-1]['accuracy']:.3f}"
    assert [r["clients_trained"] for r in report["rounds"]] == [m["clients_trained"] for m in lines]

    # `fedpriv report` re-renders the same report from the run's files.
    (run_dir / "privacy_report.json").unlink()
    proc = run_fedpriv(["report", str(run_dir)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "privacy_report.json").read_text()) == report


def test_bad_setting_stops_before_training(tmp_path):
    proc = run_fedpriv(
        ["simulate", *FAST, "privacy.sample.epsilon=-1", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path, timeout=120
    )
    assert proc.returncode != 0
    assert "privacy.sample.epsilon" in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_compose_matches_what_simulate_uses(tmp_path):
    cfg = compose(FAST, tmp_path / "x")
    assert cfg["state_dir"] == str((tmp_path / "x" / "clients").resolve())


def test_epsilon_sweep_points_keep_separate_ledgers(tmp_path):
    # A -m sweep must not let one point's clients continue another point's ledger.
    proc = run_fedpriv(
        [
            "simulate",
            "-m",
            "privacy.sample.epsilon=1,4",
            *FAST,
            ONE_ACTOR,
            "num_clients=2",
            "rounds=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, budget in (("0", 1.0), ("1", 4.0)):
        report = check_report(tmp_path / "sweep" / job)
        assert report["config"]["state_dir"] == str(tmp_path / "sweep" / job / "clients")
        for client in report["sample_level"]["clients"]:
            assert len(client["history"]) == 1  # one calibration: nothing inherited
            assert budget - 0.02 <= client["epsilon"] <= budget


@pytest.mark.parametrize("runtime", ["superlink", "engine"])
def test_default_recipe_prototypes_then_head_end_to_end(tmp_path, runtime):
    """The default recipe (recipe=probe: prototypes, then DP-SGD on the cached-feature head)
    through `fedpriv simulate`: only the head travels, and ε recomputes from the history. On
    Flower's simulation runtime (the default) and on the deprecated in-process engine."""
    run_dir = tmp_path / "probe"
    fast = [o for o in FAST if not o.startswith(("recipe=", "train."))]
    proc = run_fedpriv(
        [
            "simulate",
            *fast,
            "model.pooling=mean",
            "model.freeze_encoder=true",
            "num_clients=2",
            "rounds=3",
            f"simulation.runtime={runtime}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_report(run_dir)
    assert report["config"]["recipe"]["name"] == "probe"
    for client in report["sample_level"]["clients"]:
        assert client["history"][0][1:] == [1.0, 1]  # the prototype release, then DP-SGD steps
        assert [r["round"] for r in client["per_round"]] == [1, 2, 3]
        assert client["sample_rate"] == 0.25  # train.sample_rate null under DP: a quarter of n per batch
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_trained"] for m in metrics] == [2, 2, 2]
    for cid in ("0", "1"):
        assert list((run_dir / "clients" / cid).glob("features-*.pt"))


def test_devices_personalise_on_flowers_simulation_runtime(tmp_path):
    # The evaluation message goes through Flower's simulation runtime (Ray) to the ClientApp's
    # evaluate handler; the simulated devices keep their figures and personal models, which the
    # runtime reads from their state directories for the report and the terminal.
    base = [o for o in FAST if not o.startswith(("recipe=", "model.", "train.batch_size"))]
    run_dir = tmp_path / "personal"
    proc = run_fedpriv(
        [
            "simulate",
            *base,
            ONE_ACTOR,
            "num_clients=2",
            "rounds=2",
            "data.client_test_fraction=0.2",
            "personalize=finetune",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_report(run_dir)
    rows = report["evaluation"]["per_client"]
    assert [r["client_id"] for r in rows] == ["0", "1"]
    assert all(r["personal_accuracy"] is not None and r["test_examples"] > 0 for r in rows)
    assert "per-client personal" in summary_table(proc.stdout)
    for cid in ("0", "1"):
        assert (run_dir / "clients" / cid / "personal.pt").is_file()
    predicted = run_fedpriv(
        ["predict", "--device", str(run_dir / "clients"), "--client", "0", "--text", "hi"], cwd=tmp_path
    )
    assert predicted.returncode == 0 and predicted.stdout.endswith("\thi\n"), predicted.stderr[-2000:]
