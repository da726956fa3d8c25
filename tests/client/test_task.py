"""A client's round without Flower: budgets, write-ahead ledger, resend without new spend."""

import json
import os

import pytest
import torch

from client.privacy.ledger import Ledger
from client.privacy.node_config import ClientIdentity, DevicePolicy
from client.round import budget_epsilon, run_round
from common.data.partition import load_client_data
from common.model.factory import instantiate_model
from common.model.state import trainable_state
from common.privacy.accounting import append_steps, calibrate_noise, epsilon, sample_rate, steps_per_epoch
from tests.conftest import compose


def global_weights(cfg):
    _, labels = load_client_data(cfg, 0)
    return trainable_state(instantiate_model(cfg, len(labels)))


def who(cfg, client_id="0", max_epsilon=None):
    return ClientIdentity(
        client_id=client_id,
        partition_id=int(client_id),
        state_dir=cfg["state_dir"],
        policy=DevicePolicy(max_epsilon=max_epsilon),
    )


def expected_round_epsilons(cfg, client_id="0"):
    """ε after rounds 1, 2, ... as the contract defines them (independent of run_round)."""
    n = len(load_client_data(cfg, int(client_id))[0])
    batch = cfg["train"]["batch_size"]
    q, steps = sample_rate(n, batch), steps_per_epoch(n, batch) * cfg["train"]["local_epochs"]
    sigma = calibrate_noise(
        target_epsilon=cfg["privacy"]["sample"]["epsilon"], delta=1e-5, sample_rate=q, steps=steps * cfg["rounds"]
    )
    return [epsilon([(sigma, q, steps * r)], 1e-5) for r in range(1, cfg["rounds"] + 1)]


def test_trained_round_is_committed_before_reply(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    out = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    assert not out.declined and out.update is not None
    assert set(out.update) == set(weights)
    ledger = Ledger.load(cfg["state_dir"], "0")
    assert ledger.rounds[-1].status == "trained" and ledger.history
    assert out.privacy["history"] == [list(h) for h in ledger.history]
    assert epsilon(ledger.history, 1e-5) == pytest.approx(expected_round_epsilons(cfg)[0], abs=1e-9)
    # Only ε-relevant facts travel: no loss, no example count.
    assert not {"loss", "num-examples", "n"} & set(out.privacy)


def test_repeated_request_resends_without_new_spend(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    first = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    history = Ledger.load(cfg["state_dir"], "0").history
    again = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
    assert again.resent and not again.declined
    assert all(torch.equal(first.update[k], again.update[k]) for k in first.update)
    assert Ledger.load(cfg["state_dir"], "0").history == history
    # The same round on other weights must not train (and spend) a second time.
    other = {k: v + 1 for k, v in weights.items()}
    twice = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=other)
    assert twice.declined and twice.update is None
    assert Ledger.load(cfg["state_dir"], "0").history == history
    assert len(Ledger.load(cfg["state_dir"], "0").rounds) == 1


def test_client_budget_declines_and_never_exceeds(fast_cfg):
    probe = fast_cfg("rounds=3")
    eps = expected_round_epsilons(probe)
    cap = (eps[0] + eps[1]) / 2  # room for round 1 only
    cfg = fast_cfg("rounds=3", f"+privacy.sample.client_budgets.0={cap}")
    assert budget_epsilon(cfg, who(cfg)) == cap
    weights = global_weights(cfg)
    outcomes = [run_round(cfg, who(cfg), run_id="r", server_round=r, global_state=weights) for r in (1, 2, 3)]
    assert [o.declined for o in outcomes] == [False, True, True]
    assert outcomes[1].reason == "budget" and outcomes[1].update is None
    summary = outcomes[2].privacy
    assert summary["rounds_participated"] == 1 and summary["rounds_declined"] == 2 and summary["exhausted"]
    assert epsilon(summary["history"], 1e-5) <= cap


def test_device_cap_wins_when_lower(fast_cfg):
    cfg = fast_cfg("+privacy.sample.client_budgets.0=5.0")
    assert budget_epsilon(cfg, who(cfg, max_epsilon=2.0)) == 2.0
    assert budget_epsilon(cfg, who(cfg, max_epsilon=7.0)) == 5.0
    assert budget_epsilon(cfg, who(cfg, client_id="1")) == 8.0
    weights = global_weights(cfg)
    out = run_round(cfg, who(cfg, max_epsilon=1e-3), run_id="r", server_round=1, global_state=weights)
    assert out.declined and out.reason == "budget"
    assert Ledger.load(cfg["state_dir"], "0").history == []


def test_second_run_continues_the_ledger(fast_cfg):
    first = fast_cfg("rounds=2", "privacy.sample.epsilon=3")
    weights = global_weights(first)
    for r in (1, 2):
        run_round(first, who(first), run_id="runA", server_round=r, global_state=weights)
    spent = epsilon(Ledger.load(first["state_dir"], "0").history, 1e-5)
    assert 2.9 <= spent <= 3.0

    second = fast_cfg("rounds=2", "privacy.sample.epsilon=6")
    out = run_round(second, who(second), run_id="runB", server_round=1, global_state=weights)
    ledger = Ledger.load(second["state_dir"], "0")
    assert not out.declined
    assert out.privacy["per_round"][0]["epsilon"] > spent  # rises from where it was
    assert len(ledger.history) == 2  # runA's entry kept, runB's sigma appended
    run_round(second, who(second), run_id="runB", server_round=2, global_state=weights)
    total = epsilon(Ledger.load(second["state_dir"], "0").history, 1e-5)
    assert 5.9 <= total <= 6.0

    # A third run with the same budget has nothing left: it declines and spends nothing.
    third = run_round(second, who(second), run_id="runC", server_round=1, global_state=weights)
    assert third.declined and third.privacy["exhausted"]
    assert epsilon(Ledger.load(second["state_dir"], "0").history, 1e-5) == total


def test_resumed_run_reuses_stored_sigma(fast_cfg):
    cfg = fast_cfg("rounds=3")
    weights = global_weights(cfg)
    run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=weights)
    sigma = Ledger.load(cfg["state_dir"], "0").runs["r"].noise_multiplier
    # A later round of the same run (say after a restart) must not re-calibrate.
    run_round(cfg, who(cfg), run_id="r", server_round=2, global_state=weights)
    history = Ledger.load(cfg["state_dir"], "0").history
    assert len(history) == 1 and history[0][0] == sigma


def test_no_privacy_trains_without_history(fast_cfg):
    cfg = fast_cfg("privacy=none")
    out = run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=global_weights(cfg))
    assert not out.declined and out.update is not None
    assert Ledger.load(cfg["state_dir"], "0").history == []
    json.dumps(out.privacy, allow_nan=False)  # the summary stays valid JSON


def test_history_append_matches_ledger(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=weights)
    one = Ledger.load(cfg["state_dir"], "0")
    run_round(cfg, who(cfg), run_id="r", server_round=2, global_state=weights)
    two = Ledger.load(cfg["state_dir"], "0")
    sigma, q, steps = one.history[0]
    assert two.history == append_steps(one.history, sigma, q, steps)


def test_ledger_pins_delta_and_accountant_and_refuses_another(fast_cfg):
    cfg = fast_cfg("rounds=2")
    weights = global_weights(cfg)
    assert not run_round(cfg, who(cfg), run_id="a", server_round=1, global_state=weights).declined
    stored = json.loads((Ledger.directory(cfg["state_dir"], "0") / "ledger.json").read_text())
    assert stored["delta"] == 1e-5 and stored["accountant"] == "rdp"
    history = Ledger.load(cfg["state_dir"], "0").history
    for override, setting in (
        ("privacy.sample.delta=1e-3", "privacy.sample.delta"),
        ("privacy.sample.accountant=prv", "privacy.sample.accountant"),
    ):
        other = fast_cfg("rounds=2", override)
        out = run_round(other, who(other), run_id=f"b-{setting}", server_round=1, global_state=weights)
        assert out.declined and out.update is None and out.reason.startswith(setting)
        assert Ledger.load(cfg["state_dir"], "0").history == history  # nothing trained, nothing spent


def test_device_declines_when_delta_is_not_below_one_over_its_n(fast_cfg):
    cfg = fast_cfg("rounds=1", "privacy.sample.delta=0.5")  # each client holds ~100 examples
    out = run_round(cfg, who(cfg), run_id="r", server_round=1, global_state=global_weights(cfg))
    assert out.declined and out.update is None and out.reason.startswith("privacy.sample.delta")
    assert Ledger.load(cfg["state_dir"], "0").history == []


def test_planned_steps_are_the_steps_opacus_runs_at_a_short_batch_count(fast_cfg):
    # 744 examples at batch 8: ceil gives 93 batches, Opacus draws int(1 / (1/93)) = 92 and
    # accounts q = 1/92. Calibration and the budget check must plan exactly that, or the
    # client ends above its budget (1.3029 > 1.3 before the fix).
    cfg = fast_cfg(
        "rounds=2",
        "num_clients=2",
        "data.train_size=1488",
        "train.batch_size=8",
        "train.max_length=8",
        "privacy.sample.epsilon=1.3",
    )
    n = len(load_client_data(cfg, 0)[0])
    assert n == 744 and steps_per_epoch(n, 8) == 92
    weights = global_weights(cfg)
    outs = [run_round(cfg, who(cfg), run_id="r", server_round=r, global_state=weights) for r in (1, 2)]
    assert [o.declined for o in outs] == [False, False]
    ledger = Ledger.load(cfg["state_dir"], "0")
    calib = ledger.runs["r"]
    assert ledger.history == [(calib.noise_multiplier, calib.sample_rate, calib.planned_steps)]
    assert calib.sample_rate == 1 / 92 and calib.planned_steps == 2 * 92
    assert [e.steps for e in ledger.rounds] == [92, 184]
    assert epsilon(ledger.history, 1e-5) <= 1.3


_OVERLAP_CHILD = r"""
import json, sys, time
import client.round as task
from client.privacy.node_config import ClientIdentity, DevicePolicy
from client.round import run_round
from common.model.factory import instantiate_model
from common.model.state import trainable_state
from tests.conftest import compose
from common.data.partition import load_client_data

cfg = json.loads(sys.argv[1]); run_id = sys.argv[2]; go = sys.argv[3]
_, labels = load_client_data(cfg, 0)
weights = trainable_state(instantiate_model(cfg, len(labels)))
inner = task.local_train
def slow(*a, **k):  # keep the round open long enough for the other process to arrive
    time.sleep(1.5)
    return inner(*a, **k)
task.local_train = slow
task._client_data(cfg, 0)  # load before the start line, so both rounds begin together
open(go + "." + run_id, "w").close()
while not __import__("os").path.exists(go):
    time.sleep(0.01)
out = run_round(cfg, ClientIdentity("0", 0, cfg["state_dir"]), run_id=run_id, server_round=1, global_state=weights)
print(json.dumps({"declined": out.declined, "reason": out.reason, "sent": out.update is not None}))
"""


@pytest.mark.e2e  # starts a process
def test_two_processes_overlapping_on_one_state_dir_keep_every_spend(fast_cfg, tmp_path):
    # Two runs share one state_dir and their rounds overlap: each must see the other's
    # spend, so the ledger holds every released round's steps (before the lock, one
    # round's entry and its steps vanished).
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.conftest import child_env

    cfg = fast_cfg("rounds=2")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OVERLAP_CHILD, json.dumps(cfg), run_id, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=Path(__file__).resolve().parents[2],
        )
        for run_id in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{go}.{r}").exists() for r in ("a", "b")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "children did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    sent = [r["sent"] for r in results]
    ledger = Ledger.load(cfg["state_dir"], "0")
    trained = [e for e in ledger.rounds if e.status == "trained"]
    assert len(trained) == sum(sent) >= 1
    # Every released update's steps are in the history: per-run planned steps add up.
    released_steps = sum(ledger.runs[e.run_id].steps_per_round for e in trained)
    assert sum(h[2] for h in ledger.history) == released_steps
    assert sorted(e.steps for e in trained) == [released_steps // len(trained) * (i + 1) for i in range(len(trained))]


HEAD_RECIPE = [
    "model=tiny_bert",
    "evaluation.explain_inputs=0",
    "data.train_size=400",
    "data.test_size=80",
    "rounds=3",
]  # the default recipe on tiny_bert: prototypes, then head rounds


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_a_head_round_on_stored_features_reads_no_data_and_builds_no_encoder(tmp_path, monkeypatch, privacy):
    import client.round as task
    from common.data.features import FEATURES_PREFIX

    def run(state_dir, *, drop_features=False, forbid=False):
        cfg = compose([*HEAD_RECIPE, f"privacy={privacy}", f"state_dir={state_dir}"], tmp_path / "run")
        weights = global_weights(cfg)
        first = run_round(cfg, who(cfg), run_id="r1", server_round=1, global_state=weights)
        assert not first.declined
        stored = list(state_dir.rglob(f"{FEATURES_PREFIX}*.pt"))
        assert len(stored) == 1
        if drop_features:
            stored[0].unlink()
        with monkeypatch.context() as m:
            if forbid:  # the round must need neither the client's data nor its encoder
                for name in ("_client_data", "_fresh_model", "instantiate_model"):
                    m.setattr(
                        task,
                        name,
                        lambda *a, **k: pytest.fail("a head round on stored features read data or built the encoder"),
                    )
            second = run_round(cfg, who(cfg), run_id="r1", server_round=2, global_state=weights)
        assert not second.declined and set(second.update) == set(weights)
        return second, Ledger.load(state_dir, "0")

    fast, fast_ledger = run(tmp_path / "a", forbid=True)
    full, full_ledger = run(tmp_path / "b", drop_features=True)  # computes its features again
    # The same round as a client that computed its features: same n (q), σ and steps ...
    assert fast_ledger.history == full_ledger.history
    assert fast.privacy["per_round"] == full.privacy["per_round"]
    if privacy == "none":  # ... and, without noise, the same update
        assert all(torch.equal(fast.update[k], full.update[k]) for k in fast.update)


def test_stored_features_follow_the_bytes_of_the_data_file(tmp_path):
    from common.data.features import feature_key, features_key_parts

    path = tmp_path / "mine.csv"
    path.write_text("text,label\nhello,a\nbye,b\n")
    cfg = compose(["model=tiny_bert", "data=csv", f"data.path={path}", "data.labels=[a,b]"], tmp_path / "run")
    before = feature_key(*features_key_parts(cfg, 0, str(path)))
    assert feature_key(*features_key_parts(cfg, 0, str(path))) == before
    stamp = path.stat().st_mtime_ns
    path.write_text("text,label\nhello,a\nbye,a\n")  # relabelled in place: same name, size and settings
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a second later, whatever the clock's resolution
    assert feature_key(*features_key_parts(cfg, 0, str(path))) != before


DEVICE_RECIPE = [*HEAD_RECIPE, "privacy=sample", "train.batch_size=32", "+data.labels=[a,b]"]


def write_device_file(path, rows):
    """A device's own CSV of ``rows`` rows, a second newer than the last one (whatever the
    clock's resolution), so that an edit in place shows in its modification time."""
    stamp = path.stat().st_mtime_ns if path.exists() else None
    path.write_text("text,label\n" + "".join(f"message number {i},{'ab'[i % 2]}\n" for i in range(rows)))
    if stamp is not None:
        os.utime(path, ns=(stamp + 10**9, stamp + 10**9))


def device_round(tmp_path, path, server_round):
    cfg = compose([*DEVICE_RECIPE, f"state_dir={tmp_path / 'state'}"], tmp_path / "run")
    weights = trainable_state(instantiate_model(cfg, 2))
    me = ClientIdentity(client_id="dev", partition_id=0, state_dir=cfg["state_dir"], data_path=str(path))
    out = run_round(cfg, me, run_id="r1", server_round=server_round, global_state=weights)
    assert not out.declined
    return cfg, out


def stored_rows(tmp_path):
    from common.data.features import FEATURES_PREFIX

    [path] = (tmp_path / "state").rglob(f"{FEATURES_PREFIX}*.pt")
    return path, torch.load(path, weights_only=True)


def head_q(cfg, n):
    return sample_rate(n, cfg["train"]["batch_size"])


@pytest.mark.parametrize("rows_after", [600, 200])  # the device's file grew; an owner deleted rows
def test_a_long_lived_process_trains_on_the_device_file_as_it_is_now(tmp_path, rows_after):
    """One process, two rounds: the file changed between them, so the second round's n is
    the file's new count, and the features stored (where later processes look) are those of
    the new rows."""
    path = tmp_path / "mine.csv"
    write_device_file(path, 300)
    device_round(tmp_path, path, 1)  # the prototypes: the features of 300 rows, stored
    assert len(stored_rows(tmp_path)[1]["features"]) == 300
    write_device_file(path, rows_after)
    cfg, out = device_round(tmp_path, path, 2)  # a head round, in the same process
    assert out.privacy["history"][-1][1] == pytest.approx(head_q(cfg, rows_after))
    assert len(stored_rows(tmp_path)[1]["features"]) == rows_after


def _old_format(stored, digests):
    return {"features": stored["features"][:10], "labels": stored["labels"][:10]}


def _other_digest(stored, digests):
    return {
        "features": stored["features"][:10],
        "labels": stored["labels"][:10],
        "n": 10,
        "digests": ["0" * 64 if d else d for d in digests],
    }


def _n_disagrees(stored, digests):
    return {"features": stored["features"][:10], "labels": stored["labels"][:10], "n": 300, "digests": digests}


@pytest.mark.parametrize("tamper", [_old_format, _other_digest, _n_disagrees])
@pytest.mark.parametrize("fresh_process", [False, True])
def test_stored_features_that_do_not_match_the_data_are_not_trained_on(tmp_path, tamper, fresh_process):
    """A features file without n and the data's digest (older code's), with another file's
    digest, or whose n is not its rows' count, is computed again and overwritten: the round's
    n is the file's 300 rows, not the stored file's 10."""
    from common.data.cache import DATA_CACHE, file_digest

    path = tmp_path / "mine.csv"
    write_device_file(path, 300)
    cfg, _ = device_round(tmp_path, path, 1)
    stored_path, stored = stored_rows(tmp_path)
    digests = [file_digest(f) for f in (path, cfg["data"].get("path"), cfg["data"].get("test_path"))]
    torch.save(tamper(stored, digests), stored_path)
    if fresh_process:  # a SuperNode's next ClientApp process: nothing in memory
        DATA_CACHE.clear()
    cfg, out = device_round(tmp_path, path, 2)
    assert out.privacy["history"][-1][1] == pytest.approx(head_q(cfg, 300))
    _, again = stored_rows(tmp_path)
    assert len(again["features"]) == again["n"] == 300 and again["digests"] == digests


def test_a_process_serving_many_clients_keeps_at_most_the_bound(tmp_path, monkeypatch):
    """One simulation actor, 50 clients: the data cache never holds more than its bound
    (not 50 tokenised partitions), the data set is read and partitioned once for all of them,
    and a client served again while its entry is kept gets the very same tensors."""
    import client.round as task
    import common.data.partition as partition
    from common.data.cache import DATA_CACHE
    from common.data.sources import load_splits
    from common.data.tokenizing import tokenize

    cfg = compose(
        [
            "model=tiny_bert",
            "partition=iid",
            "num_clients=50",
            "data.train_size=200",
            "data.test_size=20",
            "train.max_length=16",
        ],
        tmp_path / "run",
    )
    DATA_CACHE.clear()
    reads, tokenised = [], []
    monkeypatch.setattr(partition, "load_splits", lambda *a, **k: reads.append(1) or load_splits(*a, **k))
    monkeypatch.setattr(task, "tokenize", lambda *a, **k: tokenised.append(1) or tokenize(*a, **k))

    first, names = task._client_data(cfg, 0)
    again, _ = task._client_data(cfg, 0)
    assert again is first and len(tokenised) == 1  # a hit: nothing tokenised again
    sizes = []
    for pid in range(50):
        data, _ = task._client_data(cfg, pid)
        assert len(data) == 4 and DATA_CACHE.read_from(data) == [None, None, None]  # no data files
        sizes.append(len(DATA_CACHE))
    assert max(sizes) == DATA_CACHE.maxsize < 50
    assert len(reads) == 1 and len(tokenised) == 50  # the data read once; each client tokenised once
    assert task._client_data(cfg, 49)[0] is data and len(tokenised) == 50  # the last client: still kept
    task._client_data(cfg, 0)  # long evicted: read again, from the partitions still kept
    assert len(tokenised) == 51 and len(reads) == 1 and len(DATA_CACHE) == DATA_CACHE.maxsize
    assert len(task._TOKENIZER_CACHE) == 1  # one tokenizer for every client
