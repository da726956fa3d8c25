"""Update checks: a bad reply never reaches the average, and the round goes on.

Each case runs the server's own path (``collect`` then ``aggregate``) and asserts that
the new global model is bit-identical to the one expected from the honest replies
alone, computed here independently (numpy, float64: the global weights plus the plain
equal-weight mean of the updates), and that no NaN reaches it.
"""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from server.round.aggregate import Reply, aggregate, check_update, collect

ROUND = 3
GLOBAL = {
    "a.weight": torch.full((4, 3), 0.5),
    "b.bias": torch.linspace(-1.0, 1.0, 5),
}  # non-zero: the step is added to it


def update(seed, **changes):
    g = torch.Generator().manual_seed(seed)
    u = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in GLOBAL.items()}
    u.update(changes)
    return u


def content(client_id, arrays=None, *, server_round=ROUND, declined=False, metrics_extra=None, records=None):
    rd = RecordDict(
        {
            "metrics": MetricRecord({"declined": int(declined), "server-round": server_round, **(metrics_extra or {})}),
            "privacy": ConfigRecord(
                {
                    "client-id": str(client_id),
                    "reason": "budget" if declined else "",
                    "report": json.dumps({"client_id": str(client_id), "history": []}),
                }
            ),
        }
    )
    if arrays is not None:
        rd["arrays"] = ArrayRecord(torch_state_dict=arrays)
    for name, record in (records or {}).items():
        rd[name] = record
    return rd


HONEST = {str(i): update(i) for i in range(3)}


def honest_replies():
    return [Reply(node_id=10 + i, content=content(cid, u)) for i, (cid, u) in enumerate(HONEST.items())]


def run_round(replies, sampled=(10, 11, 12, 13), **kwargs):
    """A round as the server runs it (no client-level DP, FedAvg at server_lr 1)."""
    result = collect(replies, server_round=ROUND, sampled=sampled, expected=GLOBAL, **kwargs)
    return result, aggregate(GLOBAL, result, n_planned=len(sampled))


def equal_weight_mean(updates):
    """GLOBAL + the plain mean of ``updates``, every client weighted equally (the reference)."""
    out = {}
    for name, value in GLOBAL.items():
        stacked = np.stack([u[name].numpy().astype(np.float64) for u in updates.values()])
        out[name] = torch.from_numpy(value.numpy().astype(np.float64) + stacked.mean(axis=0)).to(value.dtype)
    return out


def assert_honest_only(new_state):
    expected = equal_weight_mean(HONEST)
    for name in GLOBAL:
        assert torch.equal(new_state[name], expected[name])
        assert torch.isfinite(new_state[name]).all()


BAD_UPDATES = {
    "nan": update(9, **{"a.weight": torch.full((4, 3), float("nan"))}),
    "inf": update(9, **{"b.bias": torch.tensor([0, 0, float("inf"), 0, 0.0])}),
    "wrong shape": update(9, **{"a.weight": torch.zeros(3, 4)}),
    "broadcastable shape": update(9, **{"a.weight": torch.ones(1, 3)}),
    "scalar broadcast": update(9, **{"b.bias": torch.tensor(1.0)}),
    "wrong dtype": update(9, **{"a.weight": torch.zeros(4, 3, dtype=torch.float64)}),
    "missing key": {"a.weight": torch.zeros(4, 3)},
    "extra key": update(9, **{"c.weight": torch.zeros(2)}),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_and_round_goes_on(case):
    replies = [*honest_replies(), Reply(node_id=13, content=content("9", BAD_UPDATES[case]))]
    result, new_state = run_round(replies)
    assert "9" in result.rejected and set(result.accepted) == set(HONEST)
    assert_honest_only(new_state)


@pytest.mark.parametrize("count", [0, -5, float("nan"), 1e9])
def test_example_count_claims_are_refused(count):
    # Example counts never travel in fedpriv; a reply that claims one is refused.
    bad = Reply(node_id=13, content=content("9", update(9), metrics_extra={"num-examples": count}))
    result, new_state = run_round([*honest_replies(), bad])
    assert "num-examples" in result.rejected["9"]
    assert_honest_only(new_state)


def test_extra_records_and_keys_are_refused():
    leaky = Reply(node_id=13, content=content("9", update(9), records={"stats": MetricRecord({"loss": 0.1})}))
    result, new_state = run_round([*honest_replies(), leaky])
    assert "stats" in result.rejected["9"]
    assert_honest_only(new_state)


def test_oversized_payload_is_refused_before_decoding():
    huge = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(200_000)}
    result, new_state = run_round([*honest_replies(), Reply(node_id=13, content=content("9", huge))])
    assert "payload" in result.rejected["9"]
    assert_honest_only(new_state)


def test_reply_for_an_earlier_round_is_refused():
    stale = Reply(node_id=13, content=content("9", update(9), server_round=ROUND - 1))
    result, new_state = run_round([*honest_replies(), stale])
    assert "round" in result.rejected["9"]
    assert_honest_only(new_state)


def test_reply_from_a_node_not_sampled_is_refused():
    intruder = Reply(node_id=99, content=content("9", update(9)))
    result, new_state = run_round([*honest_replies(), intruder])
    assert result.rejected == {"node 99": "not sampled this round"}
    assert_honest_only(new_state)


def test_second_reply_of_a_node_or_client_is_refused():
    again = Reply(node_id=10, content=content("0", update(42)))
    twin = Reply(node_id=13, content=content("0", update(43)))  # another node claiming client 0
    result, new_state = run_round([*honest_replies(), again, twin])
    assert len(result.rejected) == 2
    assert_honest_only(new_state)


def test_huge_update_is_refused_under_a_norm_cap():
    big = Reply(node_id=13, content=content("9", {k: v * 1e6 for k, v in update(9).items()}))
    result, new_state = run_round([*honest_replies(), big], max_update_norm=1.0)
    assert "norm" in result.rejected["9"]
    assert_honest_only(new_state)


def test_zero_update_is_a_valid_update():
    zero = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}
    result, new_state = run_round([*honest_replies(), Reply(node_id=13, content=content("9", zero))])
    assert "9" in result.accepted
    expected = equal_weight_mean({**HONEST, "9": zero})
    assert all(torch.equal(new_state[k], expected[k]) for k in GLOBAL)


def test_declines_failures_and_missing_are_counted_not_averaged():
    replies = [
        *honest_replies()[:2],
        Reply(node_id=12, content=content("2", declined=True)),
        Reply(node_id=13, content=None, error="1: client crashed"),
    ]
    result, new_state = run_round(replies, sampled=(10, 11, 12, 13, 14))
    assert result.declined == {"2": "budget"} and "node 13" in result.failed
    assert result.missing == [14]
    expected = equal_weight_mean({k: HONEST[k] for k in ("0", "1")})
    assert all(torch.equal(new_state[k], expected[k]) for k in GLOBAL)


def test_malformed_reply_is_rejected():
    rd = RecordDict({"metrics": MetricRecord({"declined": 0})})
    result, new_state = run_round([*honest_replies(), Reply(node_id=13, content=rd)])
    assert "malformed" in result.rejected["node 13"]
    assert_honest_only(new_state)


def test_average_does_not_depend_on_arrival_order():
    _, a = run_round(honest_replies())
    _, b = run_round(list(reversed(honest_replies())))
    assert all(torch.equal(a[k], b[k]) for k in GLOBAL)


def test_check_update_accepts_exact_match():
    assert check_update(update(1), GLOBAL) is None
