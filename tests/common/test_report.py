"""The privacy report: ε recomputed with Opacus, schema v1, the five rendered files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from opacus.accountants import PRVAccountant, RDPAccountant

from common.report import (
    CAVEAT_EVAL_METRICS,
    build_report,
    read_metrics,
    render_run_dir,
    write_report,
)

DELTA = 1e-5
HISTORY = [[0.71, 0.016, 120]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TOP_KEYS = {
    "schema_version",
    "fedpriv_version",
    "config",
    "sample_level",
    "client_level",
    "secure_aggregation",
    "rounds",
    "evaluation",
    "caveats",
}
SAMPLE_KEYS = {"enabled", "unit", "accountant", "delta", "clients"}
CLIENT_KEYS = {
    "client_id",
    "budget_epsilon",
    "budget_source",
    "epsilon",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "history",
    "rounds_participated",
    "rounds_declined",
    "exhausted",
    "per_round",
}
CLIENT_LEVEL_KEYS = {
    "enabled",
    "unit",
    "epsilon",
    "delta",
    "noise_multiplier",
    "clipping_norm",
    "assumptions",
    "per_round",
}


def opacus_epsilon(history, delta, accountant_cls=RDPAccountant):
    acc = accountant_cls()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta)


def make_config(mode="sample", accountant="rdp", secagg=False):
    return {
        "seed": 0,
        "num_clients": 3,
        "rounds": 2,
        "secagg": secagg,
        "privacy": {
            "mode": mode,
            "sample": {
                "epsilon": 8.0,
                "delta": DELTA,
                "max_grad_norm": 1.0,
                "accountant": accountant,
                "client_budgets": {},
            },
        },
    }


def client_entry(cid, history, accountant="rdp", **extra):
    entry = {
        "client_id": cid,
        "accountant": accountant,
        "delta": DELTA,
        "budget_epsilon": 8.0,
        "noise_multiplier": 0.71,
        "max_grad_norm": 1.0,
        "sample_rate": 0.016,
        "history": history,
        # steps: the history's cumulative step count after that round (client.round.privacy_summary)
        "per_round": [{"round": 1, "epsilon": 3.2018, "steps": 30}, {"round": 2, "epsilon": 4.0704, "steps": 120}]
        if history and sum(h[2] for h in history) >= 120
        else [{"round": 1, "epsilon": 3.2018, "steps": sum(h[2] for h in history)}]
        if history
        else [],
        "rounds_participated": 2 if history else 0,
        "rounds_declined": 0,
        "exhausted": False,
    }
    entry.update(extra)
    return entry


def make_reported(accountant="rdp"):
    # Ids deliberately out of order and with 10 > 2 to check numeric sorting.
    return {
        "run_id": "a1b2",
        "clients": {
            "10": client_entry("10", [[0.71, 0.016, 30]], accountant),
            "0": client_entry("0", HISTORY, accountant),
            "2": client_entry("2", [], accountant, rounds_declined=2, exhausted=True),
        },
    }


ROUNDS = [
    {
        "round": 2,
        "accuracy": 0.84,
        "loss": 0.45,
        "clients_trained": 2,
        "clients_declined": 1,
        "clients_rejected": 0,
        "clients_failed": 0,
        "wall_s": 11.0,
        "client_epsilon": None,
    },
    {
        "round": 1,
        "accuracy": 0.81,
        "loss": 0.52,
        "clients_trained": 2,
        "clients_declined": 1,
        "clients_rejected": 0,
        "clients_failed": 0,
        "wall_s": 12.3,
    },
]


def write_run_dir(run_dir: Path, config=None, reported=None, rounds=ROUNDS) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config or make_config()), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run_dir / "clients_reported.json").write_text(json.dumps(reported or make_reported()))
    return run_dir


def minimal_client_level(sigma=1.1, delta=1e-3, rounds=2):
    """A client-level block with only the schema's keys and the mechanism, its ε consistent with it."""
    return {
        "enabled": True,
        "unit": "all data of one client",
        "epsilon": opacus_epsilon([[sigma, 1.0, rounds]], delta),
        "delta": delta,
        "noise_multiplier": sigma,
        "clipping_norm": 0.5,
        "assumptions": ["no amplification (q = 1)"],
        "mechanism": {"update_noise_multiplier": sigma, "count_stddev": None, "count_sensitivity": None},
        "per_round": [{"round": r, "epsilon": opacus_epsilon([[sigma, 1.0, r]], delta)} for r in range(1, rounds + 1)],
    }


def by_id(report):
    return {c["client_id"]: c for c in report["sample_level"]["clients"]}


# ------------------------------------------------------------------ ε recomputation


def test_epsilon_is_opacus_recomputation_of_the_history():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    clients = by_id(report)
    assert clients["0"]["epsilon"] == pytest.approx(opacus_epsilon(HISTORY, DELTA), abs=1e-6)
    assert round(clients["0"]["epsilon"], 4) == 4.0704
    assert round(clients["10"]["epsilon"], 4) == 3.2018


def test_epsilon_ignores_what_the_client_claimed():
    reported = make_reported()
    reported["clients"]["0"]["per_round"][-1]["epsilon"] = 0.1  # a client under-reporting
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    assert round(by_id(report)["0"]["epsilon"], 4) == 4.0704


def test_empty_history_has_spent_nothing():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    client = by_id(report)["2"]
    assert client["epsilon"] == 0.0
    assert client["steps"] == 0
    # With no history, σ and q fall back to what the client reported.
    assert client["noise_multiplier"] == 0.71 and client["sample_rate"] == 0.016


def test_prv_accountant_path(tmp_path):
    report = build_report(config=make_config(accountant="prv"), clients_reported=make_reported("prv"), rounds=ROUNDS)
    assert report["sample_level"]["accountant"] == "prv"
    expected = opacus_epsilon(HISTORY, DELTA, PRVAccountant)
    assert by_id(report)["0"]["epsilon"] == pytest.approx(expected, abs=1e-6)
    assert by_id(report)["0"]["epsilon"] != pytest.approx(opacus_epsilon(HISTORY, DELTA), abs=1e-3)
    write_report(tmp_path, report)
    assert "PRVAccountant" in (tmp_path / "privacy_report.md").read_text()


def test_steps_and_last_history_entry():
    reported = make_reported()
    reported["clients"]["0"]["history"] = [[0.9, 0.02, 50], [0.71, 0.016, 70]]
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    client = by_id(report)["0"]
    assert client["steps"] == 120
    assert (client["noise_multiplier"], client["sample_rate"]) == (0.71, 0.016)
    assert client["history"] == [[0.9, 0.02, 50], [0.71, 0.016, 70]]


# ------------------------------------------------------------------ schema


def test_schema_keys_and_client_fields_match_design():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    assert set(report) == TOP_KEYS
    assert report["schema_version"] == 1
    assert report["fedpriv_version"] == "0.1.0"
    assert report["config"] == make_config()
    assert report["secure_aggregation"] is False
    sample = report["sample_level"]
    assert set(sample) == SAMPLE_KEYS
    assert sample["enabled"] is True
    assert sample["unit"] == "one training example of one client"
    assert (sample["accountant"], sample["delta"]) == ("rdp", DELTA)
    assert [c["client_id"] for c in sample["clients"]] == ["0", "2", "10"]
    for client in sample["clients"]:
        assert set(client) == CLIENT_KEYS
    zero = by_id(report)["0"]
    assert zero == {
        **zero,
        "client_id": "0",
        "budget_epsilon": 8.0,
        "budget_source": "run",
        "max_grad_norm": 1.0,
        "steps": 120,
        "history": HISTORY,
        "rounds_participated": 2,
        "rounds_declined": 0,
        "exhausted": False,
    }
    assert [(p["round"], round(p["epsilon"], 4), p["steps"]) for p in zero["per_round"]] == [
        (1, 3.2018, 30),
        (2, 4.0704, 120),
    ]
    assert by_id(report)["2"]["exhausted"] is True


def test_client_level_defaults_to_disabled_block_and_is_used_as_given():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    assert report["client_level"] == {
        "enabled": False,
        "unit": "all data of one client",
        "epsilon": None,
        "delta": None,
        "noise_multiplier": None,
        "clipping_norm": None,
        "assumptions": [],
        "per_round": [],
    }
    given = minimal_client_level()
    report = build_report(
        config=make_config(mode="both"), clients_reported=make_reported(), rounds=ROUNDS, client_level=given
    )
    assert report["client_level"] == given  # consistent with its mechanism: nothing to replace
    assert set(report["client_level"]) == CLIENT_LEVEL_KEYS | {"mechanism"}
    assert not any("client_level.json" in c for c in report["caveats"])


def test_rounds_sorted_with_counts_and_without_extra_keys():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    # Rounds written before per-class results have no F1: null, as every absent key.
    assert report["rounds"] == [
        {
            "round": 1,
            "accuracy": 0.81,
            "loss": 0.52,
            "macro_f1": None,
            "weighted_f1": None,
            "clients_trained": 2,
            "clients_declined": 1,
            "clients_rejected": 0,
            "clients_failed": 0,
        },
        {
            "round": 2,
            "accuracy": 0.84,
            "loss": 0.45,
            "macro_f1": None,
            "weighted_f1": None,
            "clients_trained": 2,
            "clients_declined": 1,
            "clients_rejected": 0,
            "clients_failed": 0,
        },
    ]


@pytest.mark.parametrize("mode", ["none", "client"])
def test_sample_level_disabled_without_sample_dp(mode):
    report = build_report(config=make_config(mode=mode), clients_reported=make_reported(), rounds=ROUNDS)
    sample = report["sample_level"]
    assert sample["enabled"] is False
    assert sample["clients"] == []
    assert sample["delta"] is None and sample["accountant"] is None


def test_caveats():
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    caveats = report["caveats"]
    assert "evaluation metrics are released without DP noise" in caveats
    assert CAVEAT_EVAL_METRICS == "evaluation metrics are released without DP noise"
    text = " ".join(caveats)
    assert "os.urandom" in text and "torchcsprng" in text
    assert "sample rate" in text and "decline flags" in text
    assert "add/remove" in text
    assert "no formal privacy guarantee" not in text

    none = build_report(config=make_config(mode="none"), clients_reported=make_reported(), rounds=ROUNDS)
    assert "evaluation metrics are released without DP noise" in none["caveats"]
    assert any("no formal privacy guarantee" in c for c in none["caveats"])


def test_caveat_when_a_client_accounted_with_another_delta():
    reported = make_reported()
    reported["clients"]["0"]["delta"] = 1e-6
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    assert any("Client 0 reported delta" in c for c in report["caveats"])


@pytest.mark.parametrize(
    "setting, config",
    [
        ("privacy.mode", make_config(mode="sometimes")),
        ("privacy.sample.accountant", make_config(accountant="gdp")),
    ],
)
def test_bad_setting_is_named(setting, config):
    with pytest.raises(ValueError, match=setting):
        build_report(config=config, clients_reported=make_reported(), rounds=ROUNDS)


# ------------------------------------------------------------------ rendering


def test_render_run_dir_writes_all_five_files(tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    report = render_run_dir(run_dir)

    on_disk = json.loads((run_dir / "privacy_report.json").read_text())
    assert on_disk == report
    # Full precision in the JSON; 4 decimals in the tables.
    assert by_id(on_disk)["0"]["epsilon"] == opacus_epsilon(HISTORY, DELTA)
    md = (run_dir / "privacy_report.md").read_text()
    page = (run_dir / "privacy_report.html").read_text()
    for text in (md, page):
        assert "4.0704" in text and "3.2018" in text
        assert "evaluation metrics are released without DP noise" in text
        assert "one training example of one client" in text
        assert "all data of one client" in text
        assert "RDPAccountant" in text and "get_epsilon" in text
    assert md.index("## Summary") < md.index("## Clients") < md.index("## Rounds")
    assert 'src="plots/epsilon_per_round.png"' in page
    assert 'src="plots/accuracy_per_round.png"' in page
    assert "<style>" in page
    for plot in ("plots/epsilon_per_round.png", "plots/accuracy_per_round.png"):
        data = (run_dir / plot).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave no temp files


def test_render_run_dir_reads_client_level_json(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", config=make_config(mode="both"))
    level = minimal_client_level()
    (run_dir / "client_level.json").write_text(json.dumps(level))
    report = render_run_dir(run_dir)
    assert report["client_level"] == level
    assert "client-level ε" in (run_dir / "privacy_report.md").read_text()


def test_render_without_dp_still_writes_plots(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", config=make_config(mode="none"))
    report = render_run_dir(run_dir)
    assert report["sample_level"]["enabled"] is False
    assert (run_dir / "plots/epsilon_per_round.png").read_bytes().startswith(PNG_MAGIC)
    assert "No formal privacy guarantee" in (run_dir / "privacy_report.md").read_text()


def test_html_escapes_untrusted_strings(tmp_path):
    evil = "<script>alert(1)</script>"
    config = make_config()
    config["note"] = evil
    reported = {"run_id": "x", "clients": {evil: client_entry(evil, HISTORY)}}
    run_dir = write_run_dir(tmp_path / "run", config=config, reported=reported)
    report = render_run_dir(run_dir)
    assert report["sample_level"]["clients"][0]["client_id"] == evil
    page = (run_dir / "privacy_report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_write_report_replaces_existing_files(tmp_path):
    report = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    (tmp_path / "privacy_report.json").write_text("stale")
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "privacy_report.json").read_text()) == report


@pytest.mark.parametrize("missing", [".hydra/config.yaml", "metrics.jsonl", "clients_reported.json"])
def test_missing_file_is_named(tmp_path, missing):
    run_dir = write_run_dir(tmp_path / "run")
    (run_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        render_run_dir(run_dir)


def test_missing_run_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        render_run_dir(tmp_path / "nowhere")


def test_torn_last_metrics_line_is_skipped_but_corruption_raises(tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "accur')
    assert [r["round"] for r in render_run_dir(run_dir)["rounds"]] == [1, 2]
    metrics.write_text('{"round": 1, "accur\n' + json.dumps(ROUNDS[0]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 1"):
        render_run_dir(run_dir)


def test_caveat_names_clients_whose_reply_never_arrived():
    reported = {**make_reported(), "unreported": {"1": [2, 3]}}
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    lost = [c for c in report["caveats"] if "never reached the server" in c]
    assert len(lost) == 1 and "Client 1" in lost[0] and "2, 3" in lost[0]
    assert not [
        c
        for c in build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)["caveats"]
        if "never reached" in c
    ]


# ------------------------------------------------------------------ what clients claim does not reach the report


def test_per_round_epsilon_is_recomputed_from_the_history_not_copied():
    reported = make_reported()
    for p in reported["clients"]["0"]["per_round"]:
        p["epsilon"] = 0.001  # a client under-reporting every round
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    per_round = by_id(report)["0"]["per_round"]
    assert [p["round"] for p in per_round] == [1, 2]
    assert per_round[0]["epsilon"] == pytest.approx(opacus_epsilon([[0.71, 0.016, 30]], DELTA), abs=1e-9)
    assert per_round[1]["epsilon"] == pytest.approx(opacus_epsilon(HISTORY, DELTA), abs=1e-9)


def test_per_round_over_two_runs_cuts_the_history_at_the_rounds_steps():
    reported = make_reported()
    history = [[0.9, 0.02, 50], [0.71, 0.016, 70]]  # a ledger that spans two runs
    reported["clients"]["0"].update(
        history=history,
        per_round=[{"round": 1, "epsilon": 9.0, "steps": 85}, {"round": 2, "epsilon": 9.0, "steps": 120}],
    )
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    per_round = by_id(report)["0"]["per_round"]
    assert per_round[0]["epsilon"] == pytest.approx(opacus_epsilon([[0.9, 0.02, 50], [0.71, 0.016, 35]], DELTA))
    assert per_round[1]["epsilon"] == pytest.approx(opacus_epsilon(history, DELTA))


@pytest.mark.parametrize(
    "bad",
    [
        {"round": 2, "epsilon": 0.5},
        {"round": 2, "epsilon": 0.5, "steps": 500},
        {"round": 2, "epsilon": 0.5, "steps": "x"},
    ],
    ids=["no steps", "beyond the history", "not a number"],
)
def test_per_round_that_cannot_be_derived_is_dropped_and_said(bad):
    reported = make_reported()
    reported["clients"]["0"]["per_round"][1] = bad
    report = build_report(config=make_config(), clients_reported=reported, rounds=ROUNDS)
    assert [p["round"] for p in by_id(report)["0"]["per_round"]] == [1]
    assert any("Client 0" in c and "round(s) 2" in c and "per-round ε" in c for c in report["caveats"])


def test_budget_is_derived_from_the_config_and_a_lower_device_cap_is_marked():
    config = make_config()
    config["privacy"]["sample"]["client_budgets"] = {"10": 3.0}
    reported = make_reported()
    reported["clients"]["0"]["budget_epsilon"] = 1e9  # a client claiming a huge budget
    reported["clients"]["10"]["budget_epsilon"] = 5.0  # above its client_budgets cap: ignored
    reported["clients"]["2"]["budget_epsilon"] = 2.0  # a device's own max-epsilon: lower, kept, marked
    report = build_report(config=config, clients_reported=reported, rounds=ROUNDS)
    clients = by_id(report)
    assert (clients["0"]["budget_epsilon"], clients["0"]["budget_source"]) == (8.0, "run")
    assert (clients["10"]["budget_epsilon"], clients["10"]["budget_source"]) == (3.0, "client_budgets")
    assert (clients["2"]["budget_epsilon"], clients["2"]["budget_source"]) == (2.0, "reported by the device")


def test_tampered_clients_reported_does_not_reach_the_report(tmp_path):
    reported = make_reported()
    zero = reported["clients"]["0"]
    zero["budget_epsilon"] = 987654.0
    zero["max_grad_norm"] = 123.456
    zero["per_round"] = [
        {"round": 1, "epsilon": 0.0123456, "steps": 30},
        {"round": 2, "epsilon": 0.0234567, "steps": 120},
    ]
    run_dir = write_run_dir(tmp_path / "run", reported=reported)
    report = render_run_dir(run_dir)
    for name in ("privacy_report.json", "privacy_report.md", "privacy_report.html"):
        text = (run_dir / name).read_text()
        for tampered in ("987654", "123.456", "0.0123456", "0.0234567", "0.0123", "0.0235"):
            assert tampered not in text, (name, tampered)
    assert by_id(report)["0"]["max_grad_norm"] == 1.0  # the run's privacy.sample.max_grad_norm


def test_every_history_entry_is_shown(tmp_path):
    reported = make_reported()
    reported["clients"]["0"]["history"] = [[0.9, 0.02, 50], [0.71, 0.016, 70]]
    run_dir = write_run_dir(tmp_path / "run", reported=reported)
    render_run_dir(run_dir)
    md = (run_dir / "privacy_report.md").read_text()
    page = (run_dir / "privacy_report.html").read_text()
    assert "| 0 | 1 | 0.9 | 0.02 | 50 |" in md and "| 0 | 2 | 0.71 | 0.016 | 70 |" in md
    assert "<td>0.9</td><td>0.02</td><td>50</td>" in page
    levels = md[md.index("## The two privacy levels") : md.index("## Clients")]
    assert "0.9" in levels and "0.71" in levels  # every σ of the run, not only the last


def test_caveat_lists_exactly_the_counts_that_are_released():
    config = {**make_config(), "train": {"batch_size": 32, "local_epochs": 1}}
    report = build_report(config=config, clients_reported=make_reported(), rounds=ROUNDS)
    released = [c for c in report["caveats"] if "exact" in c and "clients_trained" in c]
    assert len(released) == 1
    text = released[0]
    for name in (
        "clients_trained",
        "clients_declined",
        "clients_rejected",
        "clients_failed",
        "clients_missing",
        "metrics.jsonl",
        "decline",
        "history",
        "rounds",
    ):
        assert name in text, name
    qn = [c for c in report["caveats"] if "probability 1/ceil(n/B)" in c and "q = 1/s" in c]
    assert len(qn) == 1 and "B = 32" in qn[0] and "multiple of B" in qn[0] and "steps" in qn[0]


def test_history_prefix_cuts_at_a_cumulative_step_count():
    from common.privacy.accounting import history_prefix

    history = [[0.9, 0.02, 50], [0.71, 0.016, 70]]
    assert history_prefix(history, 0) == []
    assert history_prefix(history, 30) == [(0.9, 0.02, 30)]
    assert history_prefix(history, 50) == [(0.9, 0.02, 50)]
    assert history_prefix(history, 85) == [(0.9, 0.02, 50), (0.71, 0.016, 35)]
    assert history_prefix(history, 120) == [(0.9, 0.02, 50), (0.71, 0.016, 70)]
    for bad in (-1, 121):
        with pytest.raises(ValueError):
            history_prefix(history, bad)


def test_a_server_optimizer_is_named_as_post_processing():
    plain = build_report(config=make_config(), clients_reported=make_reported(), rounds=ROUNDS)
    assert not any("server optimizer" in c for c in plain["caveats"])
    config = make_config()
    config["strategy"] = {"name": "fedadam"}
    report = build_report(config=config, clients_reported=make_reported(), rounds=ROUNDS)
    assert any("strategy fedadam" in c and "post-processing" in c for c in report["caveats"])


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize("module", ["common.privacy.mechanism", "common.report"])
def test_importing_the_report_or_the_mechanism_loads_no_matplotlib(module):
    # Only drawing a figure needs matplotlib (common.report.plots imports it lazily). A fresh
    # interpreter: this one may have drawn a plot already.
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.stdout.strip() == "[]"


def test_read_metrics_is_the_one_reader(tmp_path):
    from server.round.checkpoint import completed_rounds

    assert read_metrics(tmp_path, missing_ok=True) == [] == completed_rounds(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "acc')
    assert read_metrics(tmp_path) == [{"round": 1}, {"round": 2}] == completed_rounds(tmp_path)


# ------------------------------------------------------------------ client_level.json is recomputed, never trusted

# The issue's run: 4 clients, 3 rounds, fixed clipping, σ calibrated to privacy.client.epsilon = 10 at
# δ = 1e-3 (0.7587); its client_level.json was edited to state ε = 0.1.
ISSUE_CLIENT = {
    "clipping": "fixed",
    "clipping_norm": 1.0,
    "noise_multiplier": None,
    "epsilon": 10.0,
    "delta": 1e-3,
    "target_quantile": 0.5,
    "clip_lr": 0.2,
    "clipped_count_stddev": None,
}


def honest_client_level(released=3, **client):
    """client_level.json as the server writes it (common.privacy.mechanism), after ``released`` rounds."""
    from common.privacy.mechanism import ClientLevelDP

    dp = ClientLevelDP(
        {
            "rounds": 3,
            "num_clients": 4,
            "secagg": False,
            "privacy": {"mode": "both", "client": {**ISSUE_CLIENT, **client}},
        }
    )
    for r in range(1, released + 1):
        dp.record(r, released=True, clients=4, clipping_norm=dp.clipping_norm)
    return dp


def oracle_client_epsilon(mechanism: dict, releases: int, delta: float) -> float:
    """ε from DESIGN.md's words, written here: σ_eff = (σ_u⁻² + (count_stddev / count_sensitivity)⁻²)^-½
    (σ_u alone with fixed clipping), then Opacus' RDP analysis at q = 1 with its default alphas."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    sigma_u, stddev, sensitivity = (
        mechanism[k] for k in ("update_noise_multiplier", "count_stddev", "count_sensitivity")
    )
    sigma = sigma_u if stddev is None else (sigma_u**-2 + (stddev / sensitivity) ** -2) ** -0.5
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=releases, orders=RDPAccountant.DEFAULT_ALPHAS)
    return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])


def render_with_client_level(tmp_path, level: dict) -> tuple[dict, Path]:
    run_dir = write_run_dir(tmp_path / "run", config=make_config(mode="both"))
    (run_dir / "client_level.json").write_text(json.dumps(level))
    return render_run_dir(run_dir), run_dir  # what `fedpriv report RUN_DIR` runs


def level_caveats(report):
    return [c for c in report["caveats"] if "client_level.json" in c]


@pytest.mark.parametrize(
    "clipping", [{}, {"clipping": "adaptive", "clipped_count_stddev": 2.0}], ids=["fixed", "adaptive"]
)
def test_edited_client_level_epsilon_is_recomputed_from_the_mechanism_and_named(tmp_path, clipping):
    level = honest_client_level(**clipping).block()
    level["epsilon"] = 0.1
    level["per_round"][2]["epsilon"] = 0.1
    report, run_dir = render_with_client_level(tmp_path, level)
    shown = report["client_level"]
    expected = oracle_client_epsilon(level["mechanism"], 3, 1e-3)
    assert shown["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert [p["epsilon"] for p in shown["per_round"]] == pytest.approx(
        [oracle_client_epsilon(level["mechanism"], r, 1e-3) for r in (1, 2, 3)], rel=1e-9
    )
    named = level_caveats(report)
    assert any("client-level ε 0.1;" in c and f"{expected:.4g}" in c and "3 released rounds" in c for c in named)
    assert any("round(s) 3" in c for c in named)
    md = (run_dir / "privacy_report.md").read_text()
    assert f"{expected:.4f}" in md and "ε = 0.1000" not in md
    assert json.loads((run_dir / "privacy_report.json").read_text()) == report
    if not clipping:  # the issue's numbers: σ = 0.7587 over 3 releases at δ = 1e-3 gives 9.999
        assert round(shown["noise_multiplier"], 4) == 0.7587 and round(shown["epsilon"], 3) == 9.999


def test_unedited_client_level_json_is_shown_unchanged(tmp_path):
    level = honest_client_level(clipping="adaptive", clipped_count_stddev=2.0).block()
    report, _ = render_with_client_level(tmp_path, level)
    assert report["client_level"] == level
    assert level_caveats(report) == []


def test_a_resumed_run_that_counted_a_crashed_release_is_not_lowered(tmp_path):
    # Round 3 was released and written, then the server crashed before its metrics line; the
    # resumed run redoes round 3 and keeps the lost release counted (common.privacy.mechanism.restore):
    # 4 releases, 3 per_round entries. The report must not lower that ε to 3 releases.
    dp = honest_client_level(released=3)
    dp.write(tmp_path / "client_level.json")
    resumed = honest_client_level(released=0)
    resumed.restore(tmp_path / "client_level.json", completed_rounds=2)
    resumed.record(3, released=True, clients=4, clipping_norm=resumed.clipping_norm)
    level = resumed.block()
    assert level["rounds_released"] == 4 and len(level["per_round"]) == 3
    report, _ = render_with_client_level(tmp_path, level)
    assert report["client_level"] == level
    assert level_caveats(report) == []
    assert report["client_level"]["epsilon"] == pytest.approx(oracle_client_epsilon(level["mechanism"], 4, 1e-3))


def test_edited_noise_multiplier_and_history_are_replaced_and_named(tmp_path):
    level = honest_client_level().block()
    level["noise_multiplier"] = 50.0
    level["history"] = [[50.0, 1.0, 3]]
    report, _ = render_with_client_level(tmp_path, level)
    shown = report["client_level"]
    assert round(shown["noise_multiplier"], 4) == 0.7587
    assert shown["history"] == [[shown["noise_multiplier"], 1.0, 3]]
    assert opacus_epsilon(shown["history"], 1e-3) == pytest.approx(shown["epsilon"], rel=1e-9)
    named = " ".join(level_caveats(report))
    assert "50" in named and "0.7587" in named


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.pop("mechanism"),
        lambda b: b["mechanism"].update(update_noise_multiplier="x"),
        lambda b: b["mechanism"].update(update_noise_multiplier=0.0),
        lambda b: b["mechanism"].update(count_stddev=2.0),  # no sensitivity stated
        lambda b: b.update(delta=None),
    ],
    ids=["no mechanism", "sigma not a number", "sigma zero", "count without sensitivity", "no delta"],
)
def test_client_level_that_cannot_be_recomputed_shows_no_epsilon(tmp_path, edit):
    level = honest_client_level().block()
    level["epsilon"] = 0.1
    edit(level)
    report, run_dir = render_with_client_level(tmp_path, level)
    shown = report["client_level"]
    assert shown["epsilon"] is None
    assert all(p["epsilon"] is None for p in shown["per_round"])
    named = level_caveats(report)
    assert len(named) == 1 and "cannot be recomputed" in named[0] and "0.1" in named[0]
    assert "ε = 0.1000" not in (run_dir / "privacy_report.md").read_text()


def test_per_round_entry_with_an_impossible_release_count_is_dropped_and_said(tmp_path):
    level = honest_client_level().block()
    level["per_round"][1]["releases"] = 0  # fewer than the rounds released up to it
    report, _ = render_with_client_level(tmp_path, level)
    assert [p["round"] for p in report["client_level"]["per_round"]] == [1, 3]
    assert any("round(s) 2" in c and "left out" in c for c in level_caveats(report))
