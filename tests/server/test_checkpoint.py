"""Checkpoints load only when intact; metrics.jsonl defines which rounds are complete."""

import json

import pytest
import torch

from server.round.checkpoint import (
    CheckpointError,
    Manifest,
    completed_rounds,
    load_round,
    save_round,
    truncate_metrics,
)

STATE = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}


def test_round_trip(tmp_path):
    manifest = Manifest("run")
    save_round(tmp_path, manifest, 2, STATE)
    back = Manifest.load(tmp_path)
    assert back.run_id == "run" and back.rounds == manifest.rounds
    loaded = load_round(tmp_path, back, 2)
    assert all(torch.equal(loaded[k], STATE[k]) for k in STATE)


def test_a_manifest_with_the_old_server_state_key_still_loads(tmp_path):
    save_round(tmp_path, Manifest("run"), 1, STATE)
    path = tmp_path / "checkpoints" / "manifest.json"
    raw = json.loads(path.read_text())
    assert "server_state" not in raw
    path.write_text(json.dumps({**raw, "server_state": {}}))  # as runs before its removal wrote it
    back = Manifest.load(tmp_path)
    assert back.run_id == "run" and torch.equal(load_round(tmp_path, back, 1)["w"], STATE["w"])


def test_tampered_checkpoint_is_refused(tmp_path):
    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE)
    path = tmp_path / "checkpoints" / "round_0001.pt"
    evil = dict(STATE, w=STATE["w"] + 1)
    torch.save(evil, path)  # a well-formed file, but not the one the run wrote
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_round(tmp_path, Manifest.load(tmp_path), 1)


def test_missing_checkpoint_and_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="manifest.json"):
        Manifest.load(tmp_path)
    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE)
    with pytest.raises(CheckpointError, match="round 3"):
        load_round(tmp_path, manifest, 3)
    (tmp_path / "checkpoints" / "round_0001.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_round(tmp_path, manifest, 1)


def test_pickled_code_never_runs(tmp_path):
    # A payload that would execute code under a plain torch.load is refused first by its
    # hash, and would be refused again by weights_only=True.
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE)
    path = tmp_path / "checkpoints" / "round_0001.pt"
    torch.save({"w": Boom()}, path)
    import hashlib

    manifest.rounds[1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # attacker fixes the hash too
    with pytest.raises(Exception) as err:
        load_round(tmp_path, manifest, 1)
    assert not isinstance(err.value, SystemExit)


def test_completed_rounds_drops_torn_tail(tmp_path):
    lines = [json.dumps({"round": r}) for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 3, "acc')
    records = completed_rounds(tmp_path)
    assert [r["round"] for r in records] == [1, 2]
    truncate_metrics(tmp_path, records)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_completed_rounds_rejects_gaps_and_garbage(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 3}\n')
    with pytest.raises(CheckpointError, match="not 1..2"):
        completed_rounds(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(CheckpointError, match="line 2"):
        completed_rounds(tmp_path)


# --- server optimizer state (FedAvgM momentum, FedAdam moments) -------------------------


def _opt_steps():
    from server.round.optimizer import FedAdam

    g = torch.Generator().manual_seed(1)
    steps = [
        {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1 for k, v in STATE.items()} for _ in range(3)
    ]
    return FedAdam, steps


def test_resume_continues_the_optimizer_state_exactly(tmp_path):
    from server.round.checkpoint import load_optimizer_state

    FedAdam, steps = _opt_steps()
    straight, state = FedAdam(server_lr=0.1), dict(STATE)
    manifest = Manifest("run")
    for r in (1, 2):
        state = straight.step(state, steps[r - 1], server_round=r)
        save_round(tmp_path, manifest, r, state, optimizer_state=straight.state_dict(), optimizer_name="fedadam")
    uninterrupted = straight.step(state, steps[2], server_round=3)

    back = Manifest.load(tmp_path)  # a new process: only what is on disk
    resumed = FedAdam(server_lr=0.1)
    resumed.load_state_dict(load_optimizer_state(tmp_path, back, 2, optimizer_name="fedadam"))
    again = resumed.step(load_round(tmp_path, back, 2), steps[2], server_round=3)
    assert all(torch.equal(again[k], uninterrupted[k]) for k in STATE)
    assert all(torch.equal(resumed.state_dict()[p][k], straight.state_dict()[p][k]) for p in ("m", "v") for k in STATE)


def test_tampered_optimizer_state_is_refused(tmp_path):
    from server.round.checkpoint import load_optimizer_state

    FedAdam, steps = _opt_steps()
    opt = FedAdam(server_lr=0.1)
    opt.step(STATE, steps[0], server_round=1)
    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE, optimizer_state=opt.state_dict(), optimizer_name="fedadam")
    path = tmp_path / "checkpoints" / manifest.rounds[1]["optimizer_file"]
    torch.save({"m": {}, "v": {}}, path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_optimizer_state(tmp_path, Manifest.load(tmp_path), 1, optimizer_name="fedadam")


def test_missing_or_foreign_optimizer_state_is_refused(tmp_path):
    from server.round.checkpoint import load_optimizer_state

    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE)  # a fedavg round: nothing to restore
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_optimizer_state(tmp_path, manifest, 1, optimizer_name="fedadam")
    save_round(tmp_path, manifest, 2, STATE, optimizer_state={}, optimizer_name="fedavgm")
    assert load_optimizer_state(tmp_path, manifest, 2, optimizer_name="fedavgm") == {}
    with pytest.raises(CheckpointError, match="fedavgm"):
        load_optimizer_state(tmp_path, manifest, 2, optimizer_name="fedadam")
    (tmp_path / "checkpoints" / manifest.rounds[2]["optimizer_file"]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_optimizer_state(tmp_path, manifest, 2, optimizer_name="fedavgm")


def test_fedavg_checkpoints_are_unchanged(tmp_path):
    manifest = Manifest("run")
    save_round(tmp_path, manifest, 1, STATE)
    assert set(manifest.rounds[1]) == {"file", "sha256"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["manifest.json", "round_0001.pt"]


def test_only_the_last_two_optimizer_states_are_kept(tmp_path):
    # Resume needs the state after the last completed round, which is the newest or, after a
    # crash between checkpoint and metrics line, the one before; older moments only fill the disk.
    manifest = Manifest("run")
    for r in range(4):
        save_round(tmp_path, manifest, r, STATE, optimizer_state={"momentum": dict(STATE)}, optimizer_name="fedavgm")
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("optimizer_*.pt"))
    assert files == ["optimizer_0002.pt", "optimizer_0003.pt"]
    assert "optimizer_file" not in Manifest.load(tmp_path).rounds[1]
    assert all((tmp_path / "checkpoints" / f"round_{r:04d}.pt").exists() for r in range(4))
