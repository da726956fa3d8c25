"""Token classification through the real server loop and the real ClientApp, in process:
WNUT-17 sentences, a 2-layer random BERT, DP-SGD on the head over cached word features
and then through the encoder; the report's per-entity block and every ε checked."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from common.data.conll import read_conll
from common.data.features import FEATURES_PREFIX
from server.round.checkpoint import Manifest, load_round
from server.round.evaluate import evaluate, evaluate_head
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.conftest import SHARED_DATA, compose

WNUT = SHARED_DATA / "wnut17"
TYPES = {"corporation", "creative-work", "group", "location", "person", "product"}


def _subset(path, out, count):
    """The first ``count`` sentences of a CoNLL file (blank-line separated, as WNUT's)."""
    sentences = read_conll(path)
    lines = []
    for tokens, tags in zip(sentences.tokens[:count], sentences.tags[:count]):
        lines += [f"{t}\t{g}" for t, g in zip(tokens, tags)] + [""]
    out.write_text("\n".join(lines) + "\n")
    return out


def _run(tmp_path, *overrides):
    train = _subset(WNUT / "wnut17train.conll", tmp_path / "train.conll", 240)
    test = _subset(WNUT / "emerging.test.annotated", tmp_path / "test.conll", 200)
    cfg = compose(
        [
            "task=token_classification",
            "data=conll",
            f"data.path={train}",
            f"data.test_path={test}",
            "model=tiny_bert",
            "num_clients=2",
            "node_wait_s=5",
            "train.max_length=48",
            "train.local_epochs=1",
            *overrides,
        ],
        tmp_path / "run",
    )
    prepared = prepare(cfg)
    grid = InProcessGrid({n: {"state-dir": str(tmp_path / f"dev{n}"), "partition-id": n - 1} for n in (1, 2)})
    report = run_federation(grid, prepared, tmp_path / "run")
    return cfg, prepared, report


def test_token_run_reports_entities_and_recomputable_epsilon(task_identity, tmp_path):
    cfg, prepared, report = _run(tmp_path, "rounds=3", "model.freeze_encoder=false", "recipe.encoder_rounds=1")
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_trained"] for m in metrics] == [2, 2, 2]
    assert all(0.0 <= m["micro_f1"] <= 1.0 for m in metrics)

    # Rounds 1-2 (head) move the head only; round 3 (encoder) moves the encoder too.
    manifest = Manifest.load(run_dir)
    states = [load_round(run_dir, manifest, r) for r in range(4)]
    head = {"classifier.weight", "classifier.bias"}
    for r in (1, 2):
        assert {k for k in states[r] if not torch.equal(states[r][k], states[r - 1][k])} == head
    assert {k for k in states[3] if not torch.equal(states[3][k], states[2][k])} - head

    evaluation = report["evaluation"]
    assert set(evaluation["per_entity"]) == TYPES  # the six WNUT types, as the data names them
    assert evaluation["labels"][0] == "O" and len(evaluation["labels"]) == 13
    assert evaluation["num_examples"] == 200
    assert report["rounds"][-1]["micro_f1"] == evaluation["micro_f1"]
    assert report["sample_level"]["unit"] == "one sentence (one training example) of one client"
    assert "one sentence (one training example)" in (run_dir / "privacy_report.md").read_text()

    # The released model's scores are seqeval's on its own predictions.
    final = evaluate(
        prepared.model, states[3], prepared.test, batch_size=16, words=prepared.words, label_names=prepared.label_names
    )
    assert final.micro_f1 == pytest.approx(evaluation["micro_f1"])
    gold = [list(t) for t in read_conll(tmp_path / "test.conll").tags]
    assert prepared.words.gold == gold

    for client in report["sample_level"]["clients"]:
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in client["history"]]
        assert client["epsilon"] == pytest.approx(
            accountant.get_epsilon(delta=float(cfg["privacy"]["sample"]["delta"]))
        )
        assert client["epsilon"] <= 8.0 + 1e-9
        assert [r["round"] for r in client["per_round"]] == [1, 2, 3]
    for n in (1, 2):  # each device keeps its word features beside its ledger
        assert len(list((tmp_path / f"dev{n}").rglob(f"{FEATURES_PREFIX}*.pt"))) == 1


def test_head_evaluation_on_cached_features_equals_a_full_pass(tmp_path):
    cfg = compose(
        [
            "task=token_classification",
            "data=conll",
            f"data.path={_subset(WNUT / 'wnut17train.conll', tmp_path / 'a.conll', 40)}",
            f"data.test_path={_subset(WNUT / 'emerging.test.annotated', tmp_path / 'b.conll', 60)}",
            "model=tiny_bert",
            "train.max_length=32",
        ],
        tmp_path / "run",
    )
    prepared = prepare(cfg)
    state = {k: v.detach().clone() for k, v in prepared.model.named_parameters() if v.requires_grad}
    state["classifier.weight"] = torch.randn_like(state["classifier.weight"]) * 5  # predicts entities
    full = evaluate(
        prepared.model, state, prepared.test, batch_size=7, words=prepared.words, label_names=prepared.label_names
    )
    cached = evaluate_head(
        prepared.model,
        state,
        prepared.head_test_features(state),
        words=prepared.words,
        label_names=prepared.label_names,
    )
    assert cached.micro_f1 == pytest.approx(full.micro_f1, abs=1e-9)
    assert cached.accuracy == pytest.approx(full.accuracy)
    assert cached.loss == pytest.approx(full.loss, rel=1e-4)
    assert full.entities["per_entity"] == cached.entities["per_entity"]
    assert sum(prepared.words.aligned.words_cut) == full.words_cut > 0  # max_length 32 cuts some test words
