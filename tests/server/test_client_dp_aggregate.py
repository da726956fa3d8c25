"""Update checks before aggregation: norm bound, NaN and zero updates, the SecAgg sum check."""

import json
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.privacy.mechanism import ClientLevelDP, clip_update
from server.round.aggregate import Reply, RoundReplies, SecureSum, aggregate, check_sum, collect
from tests.conftest import config_group

C = 1.0
GLOBAL = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}


def norm(update):
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))


def reply(node, update, server_round=1, fits=None):
    metrics = {"declined": 0, "server-round": server_round}
    if fits is not None:
        metrics["fits"] = int(fits)
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "privacy": ConfigRecord({"client-id": str(node), "reason": "", "report": json.dumps({})}),
            "arrays": ArrayRecord(torch_state_dict=update),
        }
    )
    return Reply(node_id=node, content=content)


def dp(**client):
    base = {
        **config_group("privacy", "client")["client"],  # conf/ holds the rest (adaptive clipping's rate ...)
        "clipping": "fixed",
        "clipping_norm": C,
        "noise_multiplier": 1.0,
        "epsilon": 50.0,
        "delta": 1e-3,
    }
    return ClientLevelDP({"rounds": 3, "num_clients": 4, "secagg": False, "privacy": {"client": {**base, **client}}})


def test_every_update_that_reaches_aggregation_has_norm_at_most_c():
    torch.manual_seed(1)
    raw = {n: {k: torch.randn_like(v) * s for k, v in GLOBAL.items()} for n, s in zip((2, 3, 4, 5), (0.01, 1, 10, 1e4))}
    clipped = {n: clip_update(u, C).update for n, u in raw.items()}
    assert all(norm(u) <= C for u in clipped.values())
    # One client skips clipping: the server must not let it through.
    replies = [reply(n, clipped[n]) for n in (2, 3, 4)] + [reply(5, raw[5])]
    result = collect(replies, server_round=1, sampled=list(raw), expected=GLOBAL, max_update_norm=C)
    assert sorted(result.accepted) == ["2", "3", "4"] and "5" in result.rejected
    assert all(norm(u) <= C for u in result.accepted.values())


def test_nan_and_zero_updates_neither_crash_nor_poison_the_model():
    nan = {"w": torch.full((3, 4), float("nan")), "b": torch.ones(4)}
    zero = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}
    # On the client: a NaN update becomes zeros (never sent unclipped), a zero update stays zero.
    c_nan, c_zero = clip_update(nan, C), clip_update(zero, C)
    assert norm(c_nan.update) == 0 and not c_nan.fits
    assert norm(c_zero.update) == 0 and c_zero.fits
    # On the server: a NaN update that skipped the client's clipping is rejected, the zero accepted.
    result = collect(
        [reply(2, nan), reply(3, zero)], server_round=1, sampled=[2, 3], expected=GLOBAL, max_update_norm=C
    )
    assert list(result.accepted) == ["3"] and "non-finite" in result.rejected["2"]
    new = aggregate(GLOBAL, result, server_lr=1.0, n_planned=2, client_dp=dp())
    assert all(torch.isfinite(v).all() for v in new.values())
    plain = aggregate(GLOBAL, result, server_lr=1.0, n_planned=2)
    assert all(torch.equal(v, GLOBAL[k]) for k, v in plain.items())


def test_adaptive_bits_travel_in_plain_replies_and_are_counted():
    big = {k: torch.ones_like(v) for k, v in GLOBAL.items()}
    small = {k: torch.full_like(v, 0.01) for k, v in GLOBAL.items()}
    replies = [
        reply(2, clip_update(big, C).update, fits=clip_update(big, C).fits),
        reply(3, clip_update(small, C).update, fits=clip_update(small, C).fits),
    ]
    result = collect(replies, server_round=1, sampled=[2, 3], expected=GLOBAL, max_update_norm=C)
    assert result.fits == {"2": False, "3": True}


def test_secure_sum_is_checked_finite_and_bounded_by_senders_times_c():
    ok = {k: torch.full(v.shape, 0.1, dtype=torch.float64) for k, v in GLOBAL.items()}
    assert check_sum(ok, GLOBAL, max_norm=2 * C) is None
    too_big = {k: v * 100 for k, v in ok.items()}
    assert "above" in check_sum(too_big, GLOBAL, max_norm=2 * C)
    bad = {k: v.clone() for k, v in ok.items()}
    bad["b"][0] = float("inf")
    assert "non-finite" in check_sum(bad, GLOBAL, max_norm=2 * C)
    result = RoundReplies(secure_sum=SecureSum(total=too_big, contributors=["0", "1"], senders=2))
    assert aggregate(GLOBAL, result, server_lr=1.0, n_planned=2, client_dp=dp()) is None  # not released
