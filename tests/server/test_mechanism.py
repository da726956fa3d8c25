"""Client-level DP on the server: noise scale, planned divisor, OS-seeded noise, adaptive C, budget."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from server.aggregate import RoundReplies, aggregate
from server.mechanism import ClientLevelDP


def client_cfg(**client):
    base = {"clipping": "fixed", "clipping_norm": 0.5, "noise_multiplier": 1.3, "epsilon": 100.0, "delta": 1e-3,
            "target_quantile": 0.5, "clip_lr": 0.2, "clipped_count_stddev": None}
    return {"rounds": 5, "num_clients": 4, "secagg": False, "privacy": {"mode": "client", "client": {**base, **client}}}


def zeros(n=100_000):
    return {"a": torch.zeros(n // 4, 2, dtype=torch.float32), "b": torch.zeros(n // 2, dtype=torch.float32)}


def test_noise_std_is_sigma_c_over_planned_n_on_1e5_coordinates():
    dp = ClientLevelDP(client_cfg())
    total = {k: v.to(torch.float64) for k, v in zeros().items()}
    out = dp.privatise(total, n_planned=4)
    values = torch.cat([v.flatten() for v in out.values()])
    assert values.numel() >= 100_000
    expected = 1.3 * 0.5 / 4
    assert abs(float(values.std()) / expected - 1) < 0.05
    assert abs(float(values.mean())) < 5 * expected / math.sqrt(values.numel())


def test_noise_is_divided_by_the_planned_not_the_replied_count():
    # Two of four asked clients replied: the noise on the step stays sigma*C/4 (dividing
    # by the 2 that replied would give sigma*C/2 and a different sensitivity ratio).
    dp = ClientLevelDP(client_cfg())
    glob = zeros()
    result = RoundReplies(accepted={"0": zeros(), "1": zeros()})
    new = aggregate(glob, result, server_lr=1.0, n_planned=4, client_dp=dp)
    std = float(torch.cat([v.flatten() for v in new.values()]).double().std())
    assert abs(std / (1.3 * 0.5 / 4) - 1) < 0.05


def test_same_user_seed_draws_different_noise():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        dp = ClientLevelDP(client_cfg())
        draws.append(dp.privatise({"a": torch.zeros(1000, dtype=torch.float64)}, 4)["a"])
    assert not torch.equal(draws[0], draws[1])


def test_adaptive_clipping_grows_c_when_updates_do_not_fit_and_shrinks_it_when_they_do():
    # Large count noise is not needed to see the direction; keep it small but valid (> sigma/2).
    up = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=0.7, noise_multiplier=1.0))
    down = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=0.7, noise_multiplier=1.0))
    for _ in range(30):
        up.adapt(fits_count=0, n_planned=100)  # no update fits under C
        down.adapt(fits_count=100, n_planned=100)  # every update fits
    assert up.clipping_norm > 0.5 * math.exp(0.2 * 0.5 * 30) * 0.5
    assert down.clipping_norm < 0.5 * math.exp(-0.2 * 0.5 * 30) * 2
    # The update sum carries more noise than sigma so that both releases together are sigma.
    assert up.noise.update_sigma > up.sigma
    assert (up.noise.update_sigma ** -2 + (2 * 0.7) ** -2) ** -0.5 == pytest.approx(1.0)


def test_budget_stops_before_the_round_that_would_exceed_it():
    acc = RDPAccountant()
    acc.history = [(1.3, 1.0, 2)]
    eps2 = acc.get_epsilon(1e-3)
    dp = ClientLevelDP(client_cfg(epsilon=eps2 + 1e-9))
    for r in (1, 2):
        assert not dp.next_round_exceeds_budget(r)
        dp.record(r, released=True, clients=4, clipping_norm=0.5)
    assert dp.next_round_exceeds_budget(3)
    assert dp.stopped["round"] == 3 and "privacy.client.epsilon" in dp.stopped["reason"]
    block = dp.block()
    assert block["epsilon"] == pytest.approx(eps2) and block["history"] == [[1.3, 1.0, 2]]


def test_per_round_epsilon_rises_and_recomputes_with_opacus():
    dp = ClientLevelDP(client_cfg(noise_multiplier=None, epsilon=6.0))
    for r in range(1, 6):
        dp.record(r, released=r != 3, clients=4, clipping_norm=0.5)  # round 3 not released: no spend
    eps = [p["epsilon"] for p in dp.block()["per_round"]]
    assert eps[0] < eps[1] == eps[2] < eps[3] < eps[4] <= 6.0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in dp.block()["history"]]
    assert acc.get_epsilon(1e-3) == dp.block()["epsilon"]
    assert dp.block()["noise_calibrated"] and dp.block()["rounds_released"] == 4


def test_restore_continues_spend_and_c_from_client_level_json(tmp_path):
    dp = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0))
    for r in (1, 2):
        dp.record(r, released=True, clients=4, clipping_norm=dp.clipping_norm)
        dp.adapt(fits_count=0, n_planned=4)
        dp.write(tmp_path)
    again = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0))
    again.restore(tmp_path, completed_rounds=2)
    assert again.releases == 2 and again.clipping_norm == dp.clipping_norm
    assert again.block()["per_round"] == dp.block()["per_round"]
    with pytest.raises(ValueError):
        ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0, noise_multiplier=2.0)).restore(
            tmp_path, completed_rounds=2)
