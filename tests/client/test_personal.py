"""The personal model on the device (client.personal) and what its owner sees (device-log)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from client.personal import _accuracy, global_head, train_personal
from client.privacy import device_log, transparency
from client.privacy.node_config import ClientIdentity
from common.personal import record_evaluation

WHO = ClientIdentity(client_id="3", partition_id=3, state_dir="/nonexistent")


def _task(n=200, d=8, classes=4, seed=0):
    """Unit-norm features whose class is their largest of the first ``classes`` coordinates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    return TensorDataset(x, x[:, :classes].argmax(1))


def _cfg(name, **extra):
    personal = {"name": name, "epochs": 30, "lr": 0.5, "momentum": 0.9, "batch_size": 32, "weight_decay": 0.0}
    return {"seed": 0, "personalize": {**personal, **extra}}


GLOBAL = {"classifier.weight": torch.zeros(4, 8), "classifier.bias": torch.zeros(4)}  # a global head that knows nothing


def test_finetune_learns_the_devices_task_from_the_global_head_and_is_seeded():
    train, test = _task(seed=0), _task(seed=1)
    assert _accuracy(global_head(GLOBAL), test) < 0.5
    personal = train_personal(_cfg("finetune"), WHO, GLOBAL, train)
    assert personal.kind == "finetune" and personal.alpha is None
    assert _accuracy(personal.head(), test) > 0.9
    again = train_personal(_cfg("finetune"), WHO, GLOBAL, train)
    assert torch.equal(again.weight, personal.weight)  # seeded by the run's seed and the client id
    assert torch.equal(GLOBAL["classifier.weight"], torch.zeros(4, 8))  # the global head is untouched


def test_mixture_is_alpha_times_local_plus_the_rest_global():
    train, test = _task(seed=0), _task(seed=1)
    w = {"classifier.weight": torch.randn(4, 8), "classifier.bias": torch.randn(4)}
    personal = train_personal(_cfg("mixture", alpha=0.5, alpha_lr=0.05), WHO, w, train)
    a = personal.alpha
    assert 0.0 <= a <= 1.0
    expected = a * personal.local["weight"] + (1 - a) * w["classifier.weight"]
    assert torch.allclose(personal.weight, expected, atol=1e-6)
    assert _accuracy(personal.head(), test) > 0.85
    pinned = train_personal(_cfg("mixture", alpha=0.5, alpha_lr=0.0), WHO, w, train)
    assert pinned.alpha == pytest.approx(0.5)


def test_no_held_out_part_has_no_accuracy():
    assert _accuracy(global_head(GLOBAL), TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))) is None


def test_device_log_shows_the_devices_own_evaluations(tmp_path, capsys):
    line = transparency.Reply(
        "run12345", 5, transparency.EVALUATED, None, {"epsilon_before": 2.0, "epsilon_after": 2.0}
    )
    transparency.record(tmp_path, "7", line, sent_bytes=37)
    record_evaluation(
        tmp_path,
        "7",
        {"run_id": "run12345", "round": 5, "final": True, "personalize": "finetune", "test_examples": 40}
        | {"global_accuracy": 0.625, "personal_accuracy": 0.975},
    )
    assert device_log.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "62.5 %" in out and "97.5 %" in out and "held out" in out
    page = tmp_path / "page.html"
    assert device_log.main([str(tmp_path), "--client", "7", "--html", str(page)]) == 0
    text = page.read_text()
    assert "97.5 %" in text and "only a yes/no flag" in text
    assert device_log.summarise(transparency.read(tmp_path, "7"))["sent_without_protection"] == 0
