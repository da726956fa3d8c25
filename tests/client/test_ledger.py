"""The ledger: round-trip, atomic durable writes, never shrinking, kept replies."""

import json
import os

import pytest
import torch

from client.privacy.ledger import Ledger, RoundEntry, RunCalibration, load_reply, reply_key, save_reply
from common.privacy.accounting import epsilon
from common.storage import atomic_write_bytes


def test_round_trip(tmp_path):
    ledger = Ledger("3", history=[(0.7, 0.02, 50)])
    ledger.rounds.append(RoundEntry("run", 1, "trained", epsilon(ledger.history, 1e-5), reply_key="k"))
    ledger.runs["run"] = RunCalibration(0.7, 0.02, 50, 150)
    ledger.commit(tmp_path)
    back = Ledger.load(tmp_path, "3")
    assert back == ledger
    # JSON lists come back as Opacus' tuples, so the accountant accepts them as is.
    assert back.history == [(0.7, 0.02, 50)] and isinstance(back.history[0], tuple)
    assert json.loads((tmp_path / "3" / "ledger.json").read_text())["client_id"] == "3"


def test_missing_ledger_is_empty(tmp_path):
    ledger = Ledger.load(tmp_path, "0")
    assert ledger.history == [] and ledger.rounds == []


def test_ledger_of_another_client_is_refused(tmp_path):
    Ledger("1", history=[(1.0, 0.1, 5)]).commit(tmp_path)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "ledger.json").write_text((tmp_path / "1" / "ledger.json").read_text())
    with pytest.raises(ValueError, match="client 2"):
        Ledger.load(tmp_path, "2")


def test_commit_refuses_to_shrink_history(tmp_path):
    old = Ledger("0", history=[(1.0, 0.1, 10)])
    old.commit(tmp_path)
    for shrunk in ([], [(1.0, 0.1, 9)], [(1.1, 0.1, 10)]):
        with pytest.raises(RuntimeError):
            Ledger("0", history=shrunk).commit(tmp_path, previous=old)
    assert Ledger.load(tmp_path, "0").history == [(1.0, 0.1, 10)]
    # Growing in place (Opacus merges equal steps) or appending is fine.
    Ledger("0", history=[(1.0, 0.1, 12)]).commit(tmp_path, previous=old)
    Ledger("0", history=[(1.0, 0.1, 12), (0.5, 0.1, 1)]).commit(tmp_path, previous=Ledger.load(tmp_path, "0"))


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_bytes(tmp_path / "x", b"data")
    assert len(synced) == 2  # the file's data, then the directory entry of the rename


def test_kept_reply_is_returned_only_for_its_key(tmp_path):
    update = {"w": torch.arange(4.0)}
    key = reply_key("run", 2, "abc")
    save_reply(tmp_path, "0", key, update)
    assert torch.equal(load_reply(tmp_path, "0", key)["w"], update["w"])
    assert load_reply(tmp_path, "0", reply_key("run", 2, "other-weights")) is None
    assert load_reply(tmp_path, "1", key) is None


def test_commit_checks_the_file_not_a_stale_snapshot(tmp_path):
    # Two rounds that loaded the same ledger: the second commit would drop the first's spend.
    Ledger("0", history=[(1.0, 0.1, 10)], delta=1e-5, accountant="rdp").commit(tmp_path)
    first, second = Ledger.load(tmp_path, "0"), Ledger.load(tmp_path, "0")
    first.history = [(1.0, 0.1, 20)]
    first.commit(tmp_path, Ledger.load(tmp_path, "0"))
    second.history = [(1.0, 0.1, 10), (0.9, 0.1, 10)]
    with pytest.raises(RuntimeError, match="does not extend"):
        second.commit(tmp_path)
    assert Ledger.load(tmp_path, "0").history == [(1.0, 0.1, 20)]


def test_commit_refuses_to_change_the_pinned_delta(tmp_path):
    Ledger("0", history=[(1.0, 0.1, 10)], delta=1e-5, accountant="rdp").commit(tmp_path)
    with pytest.raises(RuntimeError, match="delta or accountant"):
        Ledger("0", history=[(1.0, 0.1, 20)], delta=1e-3, accountant="rdp").commit(tmp_path)


def test_state_dir_lock_excludes_another_holder_and_times_out(tmp_path):
    import threading

    from client.privacy.ledger import LedgerBusy, locked

    held, release = threading.Event(), threading.Event()

    def holder():
        with locked(tmp_path, "0"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(LedgerBusy):
            with locked(tmp_path, "0", timeout=0.3):
                pass
        with locked(tmp_path, "1", timeout=0.3):  # another client's directory is free
            pass
    finally:
        release.set()
        thread.join()
    with locked(tmp_path, "0", timeout=0.3):  # released with the holder
        pass


def test_two_runs_sharing_a_state_dir_each_keep_their_reply(tmp_path):
    a, b = reply_key("run-a", 1, "d"), reply_key("run-b", 1, "d")
    save_reply(tmp_path, "0", a, {"w": torch.ones(2)})
    save_reply(tmp_path, "0", b, {"w": torch.zeros(2)})
    assert torch.equal(load_reply(tmp_path, "0", a)["w"], torch.ones(2))
    assert torch.equal(load_reply(tmp_path, "0", b)["w"], torch.zeros(2))
    for i in range(6):  # only the most recent runs' replies are kept
        save_reply(tmp_path, "0", reply_key(f"run-{i}", 1, "d"), {"w": torch.ones(1)})
    assert len(list((tmp_path / "0").glob("last_reply-*.pt"))) == 4
