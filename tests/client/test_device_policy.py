"""The device decides its own privacy: crafted server instructions through the real ClientApp.

Each test sends what a hostile (or careless) server could send to a device in deployment
(no FEDPRIV_SIMULATION; the node-config is the owner's) and checks what the device did:
nothing written outside its state directory, nothing trained or spent, and nothing but a
decline (or a fixed error text) left.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import DeviceError, app
from client.privacy import transparency
from client.privacy.ledger import Ledger
from common.data.partition import load_client_data
from common.model.factory import instantiate_model
from common.model.state import trainable_state
from common.protocol import TrainInstruction, TrainReply
from tests.conftest import server_of_run

RUN_ID = "run-under-attack"


@pytest.fixture(autouse=True)
def deployed(monkeypatch):
    monkeypatch.delenv("FEDPRIV_SIMULATION", raising=False)  # a device in deployment


def weights(cfg):
    _, labels = load_client_data(cfg, 0)
    return trainable_state(instantiate_model(cfg, len(labels)))


def send(cfg: dict, node_config: dict, state, *, server_round: int = 1, clip: float | None = None) -> Message:
    """One train message to the device, as the SuperNode hands it to the ClientApp."""
    instruction = TrainInstruction(RUN_ID, server_round, json.dumps(cfg), clip)
    with server_of_run():
        msg = Message(content=instruction.to_content(state), dst_node_id=1, message_type="train")
        context = Context(run_id=7, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={})
        return app(message=msg, context=context)


def device(tmp_path, **policy) -> dict:
    return {"state-dir": str(tmp_path / "device"), "client-id": "dev", "partition-id": 0, **policy}


def declined(reply: Message) -> TrainReply:
    parsed = TrainReply.from_content(reply.content)
    assert parsed.declined and parsed.arrays is None  # no update in the reply
    return parsed


def log_lines(tmp_path) -> list[dict]:
    return transparency.read(tmp_path / "device", "dev")


def test_a_target_in_the_run_config_is_never_called(tmp_path, fast_cfg):
    """A nested ``_target_`` under model.config_overrides (Hydra's instantiate would open the
    file for writing) and a model._target_ of the server's choosing: declined, nothing written."""
    cfg = fast_cfg()
    state = weights(cfg)
    written = tmp_path / "written-by-the-server"
    cfg["model"]["config_overrides"] = {"payload": {"_target_": "builtins.open", "_args_": [str(written), "w"]}}
    reply = declined(send(cfg, device(tmp_path), state))
    assert reply.reason.startswith("model.config_overrides.payload: not a valid setting")
    assert not written.exists()

    cfg = fast_cfg()
    cfg["model"]["_target_"] = "builtins.open"
    cfg["model"]["config_overrides"] = {"trust_remote_code": True}
    reply = declined(send(cfg, device(tmp_path), state))
    assert reply.reason.startswith("model.")
    assert [line["event"] for line in log_lines(tmp_path)] == ["declined", "declined"]
    assert not Ledger.load(tmp_path / "device", "dev").rounds  # nothing spent, nothing committed


def test_no_update_leaves_without_the_device_s_own_noise(tmp_path, fast_cfg):
    """privacy=none and client-level DP (the server's noise) are declined by the default policy."""
    for mode in ("none", "client"):
        cfg = fast_cfg(f"privacy={mode}")
        reply = declined(send(cfg, device(tmp_path), weights(cfg), clip=1e9 if mode == "client" else None))
        assert reply.reason.startswith("node-config require-dp")
    lines = log_lines(tmp_path)
    assert [line["event"] for line in lines] == ["declined", "declined"]
    assert all(line["protection"] is None and line["tensors"] == {} for line in lines)
    assert not (tmp_path / "device" / "dev" / "features").exists()


def test_client_level_needs_the_owner_s_consent_and_a_bounded_clip(tmp_path, fast_cfg):
    cfg = fast_cfg("privacy=client")
    state = weights(cfg)
    owner = device(tmp_path, **{"require-dp": "false", "max-client-clip-norm": "5"})
    reply = declined(send(cfg, owner, state, clip=1e9))
    assert reply.reason.startswith("node-config max-client-clip-norm")
    sent = TrainReply.from_content(send(cfg, owner, state, server_round=2, clip=1.0).content)
    assert not sent.declined and sent.arrays is not None
    assert [line["event"] for line in log_lines(tmp_path)] == ["declined", "sent"]


def test_a_delta_above_the_device_s_cap_is_declined(tmp_path, fast_cfg):
    """The default cap is min(1e-5, 1/(10 n)); the owner may set max-delta."""
    cfg = fast_cfg("privacy.sample.delta=1e-3")
    state = weights(cfg)
    reply = declined(send(cfg, device(tmp_path), state))
    assert reply.reason.startswith("node-config max-delta")
    assert Ledger.load(tmp_path / "device", "dev").history == []
    reply = declined(send(cfg, device(tmp_path, **{"max-delta": 1e-4}), state, server_round=2))
    assert reply.reason.startswith("node-config max-delta")  # checked before the data is read
    line = log_lines(tmp_path)[-1]
    assert line["event"] == "declined" and line["epsilon_after"] is None and line["delta"] is None


def test_a_device_keeps_its_ledger_where_its_owner_put_it(tmp_path, fast_cfg):
    """Without node-config state-dir a device refuses; the run config's state_dir is never read."""
    cfg = fast_cfg()
    cfg["state_dir"] = str(tmp_path / "server-chosen")
    with pytest.raises(DeviceError, match="^the device refused the request: setting node-config state-dir is invalid"):
        send(cfg, {"client-id": "dev", "partition-id": 0}, weights(cfg))  # Flower sends this text alone
    assert not (tmp_path / "server-chosen").exists()


def test_a_sample_level_round_within_the_policy_trains(tmp_path, fast_cfg):
    cfg = fast_cfg()
    reply = TrainReply.from_content(send(cfg, device(tmp_path, **{"max-epsilon": 100}), weights(cfg)).content)
    assert not reply.declined
    line = log_lines(tmp_path)[-1]
    assert line["event"] == "sent" and line["protection"]["mechanism"] == "DP-SGD"
    assert line["delta"] == cfg["privacy"]["sample"]["delta"] and line["epsilon_after"] > 0


def test_a_non_finite_feature_never_reaches_the_released_prototypes(tmp_path, fast_cfg, monkeypatch):
    """A feature row with inf (a broken encoder, a crafted input): the release stays finite."""
    import client.round as task

    cfg = fast_cfg("recipe=probe", "model.pooling=mean", "model.normalize=true", "model.freeze_encoder=true")
    computed = task.frozen_features

    def poisoned(model, data):
        feats = computed(model, data)
        feats.tensors[0][0, 0] = float("inf")
        return feats

    monkeypatch.setattr(task, "frozen_features", poisoned)
    reply = TrainReply.from_content(send(cfg, device(tmp_path), weights(cfg)).content)
    assert not reply.declined
    released = reply.arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in released.values())
    assert log_lines(tmp_path)[-1]["protection"]["mechanism"] == "prototype release"
