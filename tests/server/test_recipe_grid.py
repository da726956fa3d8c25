"""The recipe's stages through the real server loop and the real ClientApp, in process.

prototypes → head → encoder (``recipe=probe_lora`` on a 2-layer BERT with adapters):
what each stage changes, what the ledger records, and that every ε in the report is
Opacus' own for the recorded history.
"""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from common.data.features import FEATURES_PREFIX
from server.round.checkpoint import Manifest, load_round
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.conftest import FAST, compose

RECIPE = ["model.pooling=mean", "num_clients=2", "node_wait_s=5", "train.batch_size=null", "train.sample_rate=0.25"]
LORA = ["model.lora={r: 1, alpha: 16, dropout: 0.0, target_modules: [-1.attention.self.value]}"]


def _run(tmp_path, *overrides):
    cfg = compose(
        [*(o for o in FAST if not o.startswith(("recipe=", "train."))), *RECIPE, *overrides], tmp_path / "run"
    )
    prepared = prepare(cfg)
    grid = InProcessGrid(
        {
            n: {
                "state-dir": str(tmp_path / f"dev{n}"),
                "partition-id": n - 1,
                "require-dp": False,
            }  # some runs: privacy=none
            for n in (1, 2)
        }
    )
    run_dir = tmp_path / "run"
    report = run_federation(grid, prepared, run_dir)
    manifest = Manifest.load(run_dir)
    states = [load_round(run_dir, manifest, r) for r in range(int(cfg["rounds"]) + 1)]
    return cfg, report, states, run_dir


def _changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_prototypes_then_head_then_adapters(task_identity, tmp_path):
    cfg, report, states, run_dir = _run(tmp_path, "recipe=probe_lora", "rounds=4", "recipe.encoder_rounds=1", *LORA)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_trained"] for m in metrics] == [2, 2, 2, 2]

    head = {"classifier.weight", "classifier.bias"}
    adapters = {k for k in states[0] if "lora_" in k}
    assert adapters and set(states[0]) == head | adapters
    # Round 1 (prototypes): the head's weight is 20 × unit rows (the released sums,
    # normalised); nothing else moves.
    assert _changed(states[0], states[1]) == {"classifier.weight"}
    rows = states[1]["classifier.weight"].norm(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 20.0), atol=1e-3)
    # Rounds 2–3 (head): DP-SGD moves the head only; the adapters stay as initialised.
    for r in (2, 3):
        assert _changed(states[r - 1], states[r]) == head
    # Round 4 (encoder): the adapters train too.
    assert _changed(states[3], states[4]) & adapters

    sample = report["sample_level"]
    for client in sample["clients"]:
        history = [tuple(h) for h in client["history"]]
        # The release is one Gaussian mechanism at q = 1, first in the history.
        assert history[0][1:] == (1.0, 1)
        assert all(h[0] > 0 for h in history)
        accountant = RDPAccountant()
        accountant.history = history
        assert client["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5))
        assert client["epsilon"] <= 8.0
        first = RDPAccountant()
        first.history = history[:1]
        assert client["per_round"][0] == {
            "round": 1,
            "epsilon": pytest.approx(first.get_epsilon(delta=1e-5)),
            "steps": 1,
        }
        assert [r["round"] for r in client["per_round"]] == [1, 2, 3, 4]
    assert any("DP class prototypes" in c for c in report["caveats"])
    # Each device keeps its features next to its ledger; they never left it.
    for n in (1, 2):
        assert len(list((tmp_path / f"dev{n}").rglob(f"{FEATURES_PREFIX}*.pt"))) == 1


def test_head_recipe_without_dp_is_reproducible_and_reads_cached_features(task_identity, tmp_path):
    cfg, report, states, run_dir = _run(
        tmp_path, "recipe=head", "rounds=2", "privacy=none", "model.freeze_encoder=true"
    )
    assert set(states[0]) == {"classifier.weight", "classifier.bias"}
    assert _changed(states[0], states[1]) == set(states[0])
    assert not report["sample_level"]["enabled"]
    # A second run over the same state directories reads the cached features (and would
    # fail if they were not those the encoder gives: its accuracy must match).
    first = [json.loads(line)["accuracy"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cached = list((tmp_path / "dev1").rglob(f"{FEATURES_PREFIX}*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    cfg2 = dict(cfg)
    prepared = prepare(cfg2)
    grid = InProcessGrid(
        {
            n: {
                "state-dir": str(tmp_path / f"dev{n}"),
                "partition-id": n - 1,
                "require-dp": False,
            }  # some runs: privacy=none
            for n in (1, 2)
        }
    )
    run_federation(grid, prepared, tmp_path / "run2")
    second = [json.loads(line)["accuracy"] for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert cached[0].stat().st_mtime_ns == stamp
    assert second == first


def test_the_profile_line_of_each_message_holds_times_only(task_identity, tmp_path, monkeypatch):
    profile = tmp_path / "profile.jsonl"
    monkeypatch.setenv("FEDPRIV_PROFILE", str(profile))
    _run(tmp_path, "recipe=head", "rounds=2", "privacy=none", "model.freeze_encoder=true")
    lines = [json.loads(line) for line in profile.read_text().splitlines()]
    assert [(line["server_round"], line["stage"]) for line in lines] == [(1, "head")] * 2 + [(2, "head")] * 2
    for line in lines:
        assert line["import_started"] <= line["imported"] <= line["handler_started"] <= line["handler_ended"]
        assert all(isinstance(v, (int, float)) for k, v in line.items() if k != "stage")  # no data, no paths
        assert line["warm"] is False  # not a fork of fedpriv-superexec (client/launcher.py)
    # Round 2 reads the features round 1 stored: no data read, no encoder built.
    assert [line["from_stored_features"] for line in lines] == [False, False, True, True]
