"""Per-client evaluation and personal models through the real loop and ClientApp, in process.

What issue 30 asks to be tested: a client's held-out part is never in its training batches;
the personal model's file never appears in any reply (the transparency log's tensors are the
global ones only); the ledger after a personalised run equals that of the same run without
it; ``predict --device`` uses the personal weights. And: a run that asks for none of it sends
no evaluation message at all.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import client.round as client_round
from client.personal import load_personal, personal_path
from client.personal_predict import personal_predictor
from client.privacy import transparency
from common.data.partition import client_partitions, load_client_data, load_client_split
from common.data.sources import load_splits
from common.personal import read_evaluations
from common.protocol import ARRAYS, EVALUATED, METRICS, SERVER_ROUND
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid
from tests.conftest import compose

# The default recipe (DP prototypes, then DP-SGD on the head over stored features) on tiny_bert.
BASE = [
    "model=tiny_bert",
    "evaluation.explain_inputs=0",
    "data.train_size=400",
    "data.test_size=80",
    "num_clients=2",
    "rounds=3",
    "node_wait_s=5",
]


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every message that came back (as the server received it)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sent: list[str] = []
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += [m.metadata.message_type for m in messages]
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def _run(tmp_path, name, *overrides, grid_cls=RecordingGrid):
    cfg = compose([*BASE, *overrides], tmp_path / name)
    grid = grid_cls(2)
    report = run_federation(grid, prepare(cfg), tmp_path / name)
    return cfg, report, grid


def test_a_run_without_personalisation_sends_no_evaluation_message(task_identity, tmp_path):
    cfg, report, grid = _run(tmp_path, "run")
    assert set(grid.sent) == {"train"}
    assert "per_client" not in report["evaluation"]
    assert not any((tmp_path / "run" / "clients").rglob("client_eval.jsonl"))
    assert not any((tmp_path / "run" / "clients").rglob("personal.pt"))


def test_held_out_part_is_never_in_a_training_batch(task_identity, tmp_path, monkeypatch):
    tokenised: list[list[str]] = []
    real = client_round.tokenize

    def recording(ds, *args, **kwargs):
        tokenised.append(list(ds["text"]))
        return real(ds, *args, **kwargs)

    trained_on: list[int] = []
    real_train = client_round.local_train

    def recording_train(model, data, settings):
        trained_on.append(len(data))
        return real_train(model, data, settings)

    monkeypatch.setattr(client_round, "tokenize", recording)
    monkeypatch.setattr(client_round, "local_train", recording_train)
    cfg, report, grid = _run(tmp_path, "run", "data.client_test_fraction=0.25", "personalize=finetune")

    train_all, _, _ = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=2)
    partitions = client_partitions(train_all, cfg)
    for pid in (0, 1):
        train, held_out, _ = load_client_split(cfg, pid)
        assert len(held_out) > 0 and len(train) > 0
        assert len(load_client_data(cfg, pid)[0]) == len(train)
        # The partition, row for row, is the training part and the held-out part.
        assert Counter(partitions[pid]["text"]) == Counter(train["text"]) + Counter(held_out["text"])
    # Everything the training path tokenised (each client's data, read once: the cache keeps it) is
    # exactly a training part: no held-out row ever reached a training batch, prototype or stored feature.
    train_parts = [Counter(load_client_split(cfg, pid)[0]["text"]) for pid in (0, 1)]
    assert len(tokenised) == 2 and all(Counter(t) in train_parts for t in tokenised)
    # Every DP-SGD round trained on stored features of the training parts alone.
    sizes = sorted(len(load_client_split(cfg, pid)[0]) for pid in (0, 1))
    assert trained_on and set(trained_on) <= set(sizes)
    rows = report["evaluation"]["per_client"]
    assert [r["client_id"] for r in rows] == ["0", "1"]
    assert [r["test_examples"] for r in rows] == [len(load_client_split(cfg, pid)[1]) for pid in (0, 1)]


def test_personal_model_never_leaves_and_spends_nothing(task_identity, tmp_path):
    cfg, report, grid = _run(tmp_path, "personal", "data.client_test_fraction=0.2", "personalize=finetune")
    _, plain, _ = _run(tmp_path, "plain", "data.client_test_fraction=0.2")

    # The ledgers: identical histories and ε, with or without personal models.
    for name in ("0", "1"):
        with_personal = json.loads((tmp_path / "personal" / "clients" / name / "ledger.json").read_text())
        without = json.loads((tmp_path / "plain" / "clients" / name / "ledger.json").read_text())
        assert with_personal["history"] == without["history"] and with_personal["delta"] == without["delta"]
    assert [c["epsilon"] for c in report["sample_level"]["clients"]] == [
        c["epsilon"] for c in plain["sample_level"]["clients"]
    ]
    assert [c["history"] for c in report["sample_level"]["clients"]] == [
        c["history"] for c in plain["sample_level"]["clients"]
    ]
    assert all(r["personal_accuracy"] is None for r in plain["evaluation"]["per_client"])

    # No reply carries the personal head; an evaluation reply carries one flag and the round.
    state_dir = tmp_path / "personal" / "clients"
    heads = [load_personal(state_dir, name)["head"]["classifier.weight"] for name in ("0", "1")]
    assert grid.sent.count("evaluate") == 2
    for reply in grid.replies:
        content = reply.content
        if reply.metadata.message_type == "evaluate":
            assert list(content.keys()) == [METRICS]
            assert set(content[METRICS].keys()) == {EVALUATED, SERVER_ROUND}
            assert content[METRICS][EVALUATED] == 1
            continue
        if ARRAYS in content:
            for tensor in content[ARRAYS].to_torch_state_dict().values():
                assert not any(t.shape == tensor.shape and torch.allclose(t, tensor) for t in heads)
    global_keys = {"classifier.weight", "classifier.bias"}
    for name in ("0", "1"):
        lines = transparency.read(state_dir, name)
        assert [line["event"] for line in lines] == ["sent", "sent", "sent", "evaluated"]
        assert all(set(line["tensors"]) <= global_keys for line in lines)
        assert lines[-1]["tensors"] == {} and lines[-1]["epsilon_after"] == lines[-2]["epsilon_after"]
        kept = read_evaluations(state_dir, name)
        assert len(kept) == 1 and kept[0]["final"] and kept[0]["round"] == 3
    assert any("spend no ε" in c for c in report["caveats"])
    summary = report["evaluation"]["per_client_summary"]
    assert summary["clients"] == 2 and summary["personal"]["worst"] <= summary["personal"]["mean"]
    assert (tmp_path / "personal" / "plots" / "per_client_accuracy.png").is_file()


def test_predict_device_answers_with_the_personal_weights(task_identity, tmp_path):
    cfg, report, _ = _run(tmp_path, "run", "personalize=mixture")
    state_dir = tmp_path / "run" / "clients"
    predict, client_id, kept = personal_predictor(state_dir, "1")
    assert client_id == "1" and kept["kind"] == "mixture" and 0.0 <= kept["alpha"] <= 1.0
    labels = kept["label_names"]
    text = ["please refund the charge on my card"]
    before = predict(text)[0][0]
    # Change the personal weights on the device: another class wins for every input.
    other = next(i for i, name in enumerate(labels) if name != before)
    kept["head"]["classifier.bias"] = torch.full_like(kept["head"]["classifier.bias"], -100.0)
    kept["head"]["classifier.bias"][other] = 100.0
    torch.save(kept, personal_path(state_dir, "1"))
    after, _, _ = personal_predictor(state_dir, "1")
    assert after(text)[0][0] == labels[other] != before
    # Without personalisation no client keeps a personal model: there is nothing to answer with.
    with pytest.raises(FileNotFoundError):
        personal_predictor(tmp_path / "nowhere", None)


def test_devices_evaluate_every_client_every_rounds(task_identity, tmp_path):
    cfg, report, grid = _run(tmp_path, "run", "data.client_test_fraction=0.2", "evaluation.client_every=1")
    assert grid.sent.count("evaluate") == 2 * 3
    kept = read_evaluations(tmp_path / "run" / "clients", "0")
    assert [(k["round"], k["final"]) for k in kept] == [(1, False), (2, False), (3, True)]
    assert all(k["personal_accuracy"] is None and k["global_accuracy"] is not None for k in kept)
    assert not personal_path(tmp_path / "run" / "clients", "0").exists()
    # fedpriv report rebuilds the same per-client block from the run directory alone.
    from common.report import render_run_dir

    assert render_run_dir(tmp_path / "run")["evaluation"] == report["evaluation"]
