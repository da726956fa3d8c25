"""The device's transparency log (client/privacy/transparency.py) against what the ledger records
and what the server really received, through the real ClientApp and the real round loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from client.privacy import transparency
from client.privacy.ledger import Ledger
from common.protocol import CLIENT_ID, PRIVACY, TrainReply
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid

LINE_KEYS = {
    "time",
    "run_id",
    "round",
    "event",
    "tensors",
    "bytes",
    "update_norm_before_clip",
    "update_norm_after_clip",
    "masked",
    "protection",
    "epsilon_before",
    "epsilon_after",
    "delta",
    "reason",
    "never_sent",
}


class MeteredGrid(InProcessGrid):
    """The in-process grid, counting what the server receives from each client per round.

    A SecAgg+ round's replies carry the client id only in the masked-vector stage, so
    bytes are summed per node and mapped to the client id learnt there."""

    def __init__(self, n):
        super().__init__(n)
        self.by_node: dict[tuple[int, int], int] = {}
        self.node_client: dict[int, str] = {}
        self.server_round = 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_content():
                continue
            node = reply.metadata.src_node_id
            key = (node, self.server_round)
            self.by_node[key] = self.by_node.get(key, 0) + transparency.content_bytes(reply.content)
            if PRIVACY in reply.content:
                self.node_client[node] = str(reply.content[PRIVACY][CLIENT_ID])
            elif "fitres.metrics" in reply.content:  # SecAgg+'s legacy FitRes
                self.node_client[node] = str(reply.content["fitres.metrics"][CLIENT_ID])
        return replies

    def received(self) -> dict[tuple[str, int], int]:
        return {(self.node_client[n], r): b for (n, r), b in self.by_node.items()}


@pytest.fixture
def metered(monkeypatch):
    """Tell each MeteredGrid which round the loop is in, so bytes are counted per round."""
    import server.round.loop as loop

    original = loop._Rounds.run

    def run(self, server_round):
        if server_round == getattr(self.grid, "crash_at", None):
            raise RuntimeError("the server crashed")
        self.grid.server_round = server_round
        return original(self, server_round)

    monkeypatch.setattr(loop._Rounds, "run", run)


def _run(grid: MeteredGrid, cfg: dict, run_dir: Path, *, resume: bool = False) -> dict:
    return run_federation(grid, prepare(cfg), run_dir, resume=resume)


def _ledger_rounds(state_dir, client_id):
    return [
        (e.run_id, e.round, "sent" if e.status == "trained" else e.status)
        for e in Ledger.load(state_dir, client_id).rounds
    ]


def _logged(state_dir, client_id, *, resent=False):
    return [
        (line["run_id"], line["round"], line["event"])
        for line in transparency.read(state_dir, client_id)
        if resent or line["event"] != transparency.RESENT
    ]


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_log_matches_the_ledger_and_the_bytes_the_server_received(task_identity, metered, fast_cfg, tmp_path, secagg):
    cfg = fast_cfg("num_clients=2", "rounds=2", f"secagg={str(secagg).lower()}")
    grid = MeteredGrid(2)
    _run(grid, cfg, tmp_path / "run")
    state_dir = cfg["state_dir"]
    received = grid.received()
    for client_id in ("0", "1"):
        lines = transparency.read(state_dir, client_id)
        assert _logged(state_dir, client_id) == _ledger_rounds(state_dir, client_id)
        assert [line["round"] for line in lines] == [1, 2]
        for line in lines:
            assert set(line) == LINE_KEYS
            assert line["event"] == "sent" and line["masked"] is secagg
            # Under SecAgg+: every message of the round (4 stages), not only the masked vector.
            assert line["bytes"] == received[(client_id, line["round"])]
            assert line["tensors"] and all(isinstance(s, list) for s in line["tensors"].values())
            p = line["protection"]
            assert (
                p["mechanism"] == "DP-SGD"
                and p["sigma"] > 0
                and p["clip_norm"] == cfg["privacy"]["sample"]["max_grad_norm"]
                and 0 < p["sample_rate"] <= 1
                and p["steps"] >= 1
            )
        # ε is the ledger's: it starts at 0, never goes down, and ends at the ledger's ε.
        assert lines[0]["epsilon_before"] == 0.0
        assert lines[0]["epsilon_after"] == lines[1]["epsilon_before"] < lines[1]["epsilon_after"]
        assert lines[-1]["epsilon_after"] == pytest.approx(Ledger.load(state_dir, client_id).rounds[-1].epsilon)


def test_log_follows_the_ledger_across_a_restart_a_resend_and_a_decline(task_identity, metered, fast_cfg, tmp_path):
    # Client 1 may spend almost nothing: it declines every round for its budget.
    cfg = fast_cfg("num_clients=2", "rounds=2")
    cfg["privacy"]["sample"]["client_budgets"] = {"1": 0.01}
    run_dir = tmp_path / "run"
    crashing = MeteredGrid(2)
    crashing.crash_at = 2
    with pytest.raises(RuntimeError, match="crashed"):
        _run(crashing, cfg, run_dir)
    # The server restarts and continues the same run from its checkpoint.
    _run(MeteredGrid(2), cfg, run_dir, resume=True)
    state_dir = cfg["state_dir"]
    assert [e for _, _, e in _logged(state_dir, "0")] == ["sent", "sent"]
    assert _logged(state_dir, "0") == _ledger_rounds(state_dir, "0")
    declines = transparency.read(state_dir, "1")
    assert [(line["round"], line["event"], line["reason"]) for line in declines] == [
        (1, "declined", "budget"),
        (2, "declined", "budget"),
    ]
    assert all(line["tensors"] == {} and line["bytes"] > 0 for line in declines)
    assert _logged(state_dir, "1") == _ledger_rounds(state_dir, "1")

    # The server asks round 2 again (its reply was lost): the kept reply is resent, no new spend.
    from flwr.app import Message

    from common.protocol import TrainInstruction
    from server.round.checkpoint import Manifest, load_round

    manifest = Manifest.load(run_dir)
    before_round2 = load_round(run_dir, manifest, 1)
    grid = MeteredGrid(2)
    grid.server_round = 2
    instruction = TrainInstruction(manifest.run_id, 2, json.dumps(cfg))
    [reply] = grid.send_and_receive(
        [Message(content=instruction.to_content(before_round2), dst_node_id=0, message_type="train")]
    )
    assert not TrainReply.from_content(reply.content).declined
    lines = transparency.read(state_dir, "0")
    assert [line["event"] for line in lines] == ["sent", "sent", "resent"]
    assert lines[2]["bytes"] == lines[1]["bytes"] == grid.received()[("0", 2)]
    assert lines[2]["epsilon_before"] == lines[2]["epsilon_after"] == lines[1]["epsilon_after"]
    assert _logged(state_dir, "0") == _ledger_rounds(state_dir, "0")  # a resend is no new ledger round


def test_nothing_from_the_training_data_is_in_the_log(task_identity, metered, fast_cfg, tmp_path):
    cfg = fast_cfg("num_clients=2", "rounds=1")
    prepared = prepare(cfg)
    _run(MeteredGrid(2), cfg, tmp_path / "run")
    from common.data.sources import load_splits

    train, _, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=2)
    text = transparency.log_path(cfg["state_dir"], "0").read_text()
    assert not [t for t in train["text"] if t in text]
    assert not any(f'"{label}"' in text for label in prepared.label_names)
    for line in transparency.read(cfg["state_dir"], "0"):
        assert set(line) == LINE_KEYS  # no loss, no example count, no per-example value
        assert line["never_sent"] == list(transparency.NEVER_SENT)
        # Its only texts: the time, the run, the event, the mechanism and the tensors' names.
        texts = {
            line["time"],
            line["run_id"],
            line["event"],
            line["reason"],
            line["protection"]["mechanism"],
            *line["tensors"],
            *line["never_sent"],
        }
        assert set(_strings(line)) <= texts


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_device_log_renders_the_log_for_its_owner(task_identity, metered, fast_cfg, tmp_path, capsys):
    from server import cli

    cfg = fast_cfg("num_clients=2", "rounds=2")
    _run(MeteredGrid(2), cfg, tmp_path / "run")
    page = tmp_path / "device.html"
    argv = sys.argv
    sys.argv = ["fedpriv", "device-log", cfg["state_dir"], "--client", "0", "--html", str(page)]
    try:
        assert cli.main() == 0
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    lines = transparency.read(cfg["state_dir"], "0")
    assert "2 message(s) in 1 run(s): 2 update(s) sent" in out
    assert f"privacy spent so far: {lines[-1]['epsilon_after']:.2f} at delta 1e-05" in out
    assert "without protection" not in out
    text = page.read_text()
    assert "What left this device" in text and "data:image/png;base64," in text
    assert text.count("sent an update") == 2
    # An empty state directory says that nothing left it, and exits 1.
    sys.argv = ["fedpriv", "device-log", str(tmp_path / "nothing")]
    try:
        assert cli.main() == 1
    finally:
        sys.argv = argv


def test_an_update_sent_without_protection_is_counted_and_named_first(tmp_path, capsys):
    """A DP round's ε must not hide an update that left with no noise added on the device."""
    from client.privacy import device_log

    update = {"w": torch.ones(2)}
    dp = {
        "mechanism": "DP-SGD",
        "sigma": 1.0,
        "clip_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 3,
        "epsilon_before": 0.0,
        "epsilon_after": 0.8,
        "delta": 1e-5,
    }
    transparency.record(tmp_path, "7", transparency.Reply("run-a", 1, "sent", update, protection=dp), sent_bytes=10)
    transparency.record(tmp_path, "7", transparency.Reply("run-b", 4, "sent", update, protection=None), sent_bytes=10)
    total = device_log.summarise(transparency.read(tmp_path, "7"))
    assert total["sent_without_protection"] == 1 and total["unprotected_rounds"] == [("run-b", 4)]
    assert (total["epsilon"], total["delta"]) == (0.8, 1e-5)
    assert device_log.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    warning = out.index("1 update(s) sent without protection")
    assert warning < out.index("run run-a") and "run run-b round 4" in out
    assert "0.80 at delta 1e-05" in out


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_is_corruption(tmp_path):
    path = transparency.log_path(tmp_path, "7")
    path.parent.mkdir(parents=True)
    path.write_text('{"round": 1}\n{"round": 2')  # a crash cut the second append short
    assert transparency.read(tmp_path, "7") == [{"round": 1}]
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        transparency.read(tmp_path, "7")
