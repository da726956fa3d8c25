"""Checkpoints load only when intact; metrics.jsonl defines which rounds are complete."""

import json

import pytest
import torch

from server.checkpoint import (
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
    save_round(tmp_path, manifest, 2, STATE, {"accountant": [[1.0, 1.0, 2]]})
    back = Manifest.load(tmp_path)
    assert back.run_id == "run" and back.server_state == {"accountant": [[1.0, 1.0, 2]]}
    loaded = load_round(tmp_path, back, 2)
    assert all(torch.equal(loaded[k], STATE[k]) for k in STATE)


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
