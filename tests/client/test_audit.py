"""The audit's white-box scoring on a tiny model: directions and what one step releases."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.canary_audit import canary_directions, flat_trainable
from client.training.dp_train import DPSettings, TrainSettings, local_train
from common.model.state import model_inputs
from common.privacy.audit_bounds import joint_scores
from tests.client.test_dp_train import tiny_data, tiny_model

LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"])


def reference_directions(model, data):
    """Unit descent directions by one backward per example, dropout off."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for ids, mask, label in zip(*data.tensors):
        logits = model(**model_inputs(ids[None], mask[None])).logits
        g = -torch.cat([x.reshape(-1) for x in torch.autograd.grad(F.cross_entropy(logits, label[None]), params)])
        rows.append(g / g.norm())
    return torch.stack(rows)


def test_directions_match_per_example_autograd_and_leave_the_model_clean():
    model = tiny_model(lora=LORA, hidden_dropout_prob=0.3)  # dropout must not reach the directions
    data = tiny_data(7)
    reference = reference_directions(copy.deepcopy(model), data)
    model.train()
    got = canary_directions(model, data, chunk=3)  # chunks of unequal size
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())
    for p in model.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None
        assert not hasattr(p, "_current_grad_sample")
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_one_step_without_noise_separates_included_canaries_exactly(clip):
    # q = 1 and one SGD step: the released update is -lr/B times the sum of the clipped
    # gradients at the start, so the joint fit on all examples' directions gives every
    # included canary a positive coefficient and every excluded one about zero.
    model = tiny_model(lora=LORA)
    canaries, real = tiny_data(12, seed=1), tiny_data(4, seed=2)
    included = torch.tensor([i % 2 == 0 for i in range(12)])
    data = TensorDataset(*(torch.cat([r, c[included]]) for r, c in zip(real.tensors, canaries.tensors)))
    known = TensorDataset(*(torch.cat([c, r]) for c, r in zip(canaries.tensors, real.tensors)))
    directions = canary_directions(model, known)
    start = flat_trainable(model)
    local_train(
        model,
        data,
        TrainSettings(epochs=1, batch_size=len(data), lr=0.1, optimizer="sgd", dp=DPSettings(0.0, clip, "rdp", ())),
    )
    scores = joint_scores(directions, flat_trainable(model) - start, ridge=1e-9)[:12]
    assert scores[~included].abs().max() < 0.05 * scores[included].min()


# --------------------------------------------------------------------------- the run and the verdict


def test_real_examples_come_from_the_held_out_split_the_size_of_the_client(fast_cfg):
    from client.canary_audit import real_examples
    from common.data.partition import load_client_data
    from common.data.sources import load_splits

    cfg = fast_cfg("data.test_size=200")
    examples, names = real_examples(cfg, 1)
    partition, client_names = load_client_data(cfg, 1)
    _, test, _ = load_splits(cfg["data"], seed=cfg["seed"], num_clients=cfg["num_clients"])
    assert names == client_names and len(examples) == len(partition) == 100
    assert set(examples["text"]) <= set(test["text"])
    assert set(examples["text"]).isdisjoint(partition["text"])
    assert len(real_examples(fast_cfg("data.test_size=60"), 1)[0]) == 60  # a smaller test split: all of it


def test_run_audit_reports_its_power_and_a_verdict_that_cannot_be_consistent_below_it(fast_cfg):
    from client.canary_audit import REAL_DATA, run_audit
    from common.privacy.audit_bounds import max_detectable_epsilon

    cfg = fast_cfg("rounds=1", "data.train_size=40", "train.max_length=8")
    result = run_audit(
        cfg,
        canaries=20,
        guesses=10,
        client=cfg["audit"]["client"],
        noise=cfg["audit"]["noise"],
        confidence=cfg["audit"]["confidence"],
    )
    assert result["max_detectable_epsilon"] == pytest.approx(max_detectable_epsilon(10, m=20, delta=1e-5))
    assert result["max_detectable_epsilon"] < result["epsilon_accounted"]
    assert result["verdict"] == "inconclusive" and "consistent" not in result
    assert result["real_data"] == REAL_DATA and result["real_examples"] == 10


def test_the_power_preset_composes_from_the_command_line(tmp_path):
    from tests.conftest import compose

    default = compose([], tmp_path / "a")
    assert default["audit"] == {"canaries": 200, "guesses": 150, "client": 0, "noise": True, "confidence": 0.95}
    cfg = compose(["audit=power", "audit.noise=false"], tmp_path / "b")
    assert cfg["audit"] == {"canaries": 160, "guesses": 120, "client": 0, "noise": False, "confidence": 0.95}
    assert cfg["rounds"] == 2 and cfg["data"]["train_size"] == 40 and cfg["model"]["name_or_path"] == "minilm"
    assert {k: cfg["train"][k] for k in ("max_length", "batch_size", "lr", "local_epochs")} == {
        "max_length": 8,
        "batch_size": 32,
        "lr": 0.2,
        "local_epochs": 3,
    }
    assert cfg["model"]["config_overrides"] == {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    # The rest of the run stays the default's, and a later override still wins.
    assert {k: v for k, v in cfg["privacy"].items()} == default["privacy"]
    assert compose(["audit=power", "rounds=3"], tmp_path / "c")["rounds"] == 3


def test_dropout_off_in_the_preset_reaches_the_model(tmp_path):
    from common.model.factory import instantiate_model
    from tests.conftest import compose

    model = instantiate_model(compose(["audit=power", "model=tiny_bert"], tmp_path / "run"), 2)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts)


STUB = {}


def stub_run_audit(cfg, **kwargs):
    """What client.canary_audit.run_audit returns, with the numbers a test sets in STUB."""
    return {
        "client": 0,
        "canaries": kwargs["canaries"],
        "guesses": kwargs["guesses"],
        "confidence": 0.95,
        "delta": 1e-5,
        "noise": kwargs["noise"],
        **STUB,
    }


@pytest.mark.parametrize(
    "bound, power, accounted, verdict, rc",
    [
        (0.16, 3.656, 7.99, "inconclusive", 0),  # the power preset with DP on
        (3.656, 3.656, float("inf"), "inconclusive", 0),  # noise off
        (0.0, 3.876, 7.99, "inconclusive", 0),  # the defaults: they cannot show 8
        (3.2, 3.656, 7.99, "inconclusive", 0),
        (0.5, 6.0, 2.0, "consistent", 0),
        (3.0, 3.656, 2.0, "exceeds", 1),
    ],
)
def test_cli_prints_the_power_in_every_verdict_and_exits_1_only_when_exceeded(
    tmp_path, monkeypatch, capsys, bound, power, accounted, verdict, rc
):
    import json

    from server import cli

    monkeypatch.setattr(cli, "load_command", {"audit": stub_run_audit}.__getitem__)
    monkeypatch.setitem(STUB, "epsilon_lower_bound", bound)
    monkeypatch.setitem(STUB, "max_detectable_epsilon", power)
    monkeypatch.setitem(STUB, "epsilon_accounted", accounted)
    monkeypatch.setitem(STUB, "correct", 120)
    monkeypatch.setitem(STUB, "verdict", "consistent")  # whatever the runner says, the CLI's rule decides
    assert cli.audit([f"hydra.run.dir={tmp_path}", "model=tiny_bert"]) == rc
    line = capsys.readouterr().out
    assert f"can show at most {power:.3f}" in line and verdict in line.lower()
    if verdict != "consistent":
        assert "consistent" not in line.lower()
    written = json.loads((tmp_path / "audit.json").read_text())["audit"]
    assert written["verdict"] == verdict and written["max_detectable_epsilon"] == power
