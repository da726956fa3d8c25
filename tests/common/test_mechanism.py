"""Client-level DP on the server: noise scale, planned divisor, OS-seeded noise, adaptive C, budget."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from common.privacy.accounting import combined_noise_multiplier
from common.privacy.mechanism import ClientLevelDP
from server.round.aggregate import RoundReplies, aggregate


def client_cfg(**client):
    base = {
        "clipping": "fixed",
        "clipping_norm": 0.5,
        "noise_multiplier": 1.3,
        "epsilon": 100.0,
        "delta": 1e-3,
        "target_quantile": 0.5,
        "clip_lr": 0.2,
        "clipped_count_stddev": None,
    }
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
    # Large count noise is not needed to see the direction; keep it small but valid (> sigma).
    up = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=1.5, noise_multiplier=1.0))
    down = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=1.5, noise_multiplier=1.0))
    for _ in range(30):
        up.adapt(fits_count=0, n_planned=100)  # no update fits under C
        down.adapt(fits_count=100, n_planned=100)  # every update fits
    assert up.clipping_norm > 0.5 * math.exp(0.2 * 0.5 * 30) * 0.5
    assert down.clipping_norm < 0.5 * math.exp(-0.2 * 0.5 * 30) * 2
    # The update sum carries more noise than sigma so that both releases together are sigma.
    assert up.noise.update_sigma > up.sigma
    assert combined_noise_multiplier(up.noise.update_sigma, 1.5) == pytest.approx(1.0)  # 0/1 bits: sensitivity 1


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
        dp.write(tmp_path / "client_level.json")
    again = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0))
    again.restore(tmp_path / "client_level.json", completed_rounds=2)
    assert again.releases == 2 and again.clipping_norm == dp.clipping_norm
    assert again.block()["per_round"] == dp.block()["per_round"]
    with pytest.raises(ValueError):
        ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0, noise_multiplier=2.0)).restore(
            tmp_path / "client_level.json", completed_rounds=2
        )


def _epsilon_from_mechanism(block) -> float:
    """ε recomputed from the report's ``mechanism`` object alone, as DESIGN.md states it."""
    mech = block["mechanism"]
    sigma_u, stddev, sensitivity = mech["update_noise_multiplier"], mech["count_stddev"], mech["count_sensitivity"]
    sigma = sigma_u if stddev is None else (sigma_u**-2 + (stddev / sensitivity) ** -2) ** -0.5  # written here
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, len([p for p in block["per_round"] if p.get("released", True)]))]
    return acc.get_epsilon(block["delta"])


@pytest.mark.parametrize("clients,rounds,budget,delta", [(4, 3, 10.0, 1e-3), (10, 20, 4.0, 1e-3), (100, 50, 2.0, 1e-4)])
def test_adaptive_clipping_epsilon_recomputes_from_the_mechanism_within_the_budget(clients, rounds, budget, delta):
    # The three cases. The 0/1 bits of "update fits" have sensitivity 1: one client
    # moves the update sum by C and the count by 1 at once, so the stacked release
    # [sum / (σ_u C), count / σ_b] has Mahalanobis sensitivity √(σ_u⁻² + σ_b⁻²).
    cfg = client_cfg(clipping="adaptive", noise_multiplier=None, epsilon=budget, delta=delta)
    cfg.update(rounds=rounds, num_clients=clients)
    dp = ClientLevelDP(cfg)
    for r in range(1, rounds + 1):
        dp.record(r, released=True, clients=clients, clipping_norm=dp.clipping_norm)
    block = dp.block()
    mech = block["mechanism"]
    assert mech["count_sensitivity"] == 1.0 and mech["count_stddev"] == dp.noise.count_stddev
    combined = combined_noise_multiplier(
        mech["update_noise_multiplier"], mech["count_stddev"], mech["count_sensitivity"]
    )
    assert combined == pytest.approx(dp.sigma, rel=1e-9)  # 1 / that Mahalanobis sensitivity
    recomputed = _epsilon_from_mechanism(block)
    assert recomputed <= block["epsilon"] + 1e-6 and recomputed <= budget


def test_fixed_clipping_mechanism_has_no_count():
    dp = ClientLevelDP(client_cfg())
    dp.record(1, released=True, clients=4, clipping_norm=0.5)
    assert dp.block()["mechanism"] == {"update_noise_multiplier": 1.3, "count_stddev": None, "count_sensitivity": None}
    assert _epsilon_from_mechanism(dp.block()) == dp.block()["epsilon"]


def test_adaptive_count_noise_has_the_stated_stddev():
    # Read the noise adapt() really adds back out of C's geometric step:
    # log(C_new / C) = -lr (noisy / n - γ)  =>  noisy = (γ - log(C_new / C) / lr) n, with 0 fits.
    dp = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=2.0))
    draws = []
    for _ in range(4000):
        before = dp.clipping_norm
        dp.adapt(fits_count=0, n_planned=4)
        draws.append((dp.target_quantile - math.log(dp.clipping_norm / before) / dp.clip_lr) * 4)
        dp.clipping_norm = before
    assert abs(float(np.std(draws)) / 2.0 - 1) < 0.05


def test_resume_with_more_rounds_keeps_the_calibrated_sigma_and_the_budget_stop(tmp_path):
    first = client_cfg(noise_multiplier=None, epsilon=10.0)
    first["rounds"] = 3
    dp = ClientLevelDP(first)
    for r in (1, 2):
        dp.record(r, released=True, clients=4, clipping_norm=dp.clipping_norm)
        dp.write(tmp_path / "client_level.json")
    longer = client_cfg(noise_multiplier=None, epsilon=10.0)
    longer["rounds"] = 6  # would calibrate a larger sigma
    again = ClientLevelDP(longer)
    assert again.sigma != dp.sigma
    again.restore(tmp_path / "client_level.json", completed_rounds=2)
    assert again.sigma == dp.sigma and again.releases == 2
    assert not again.next_round_exceeds_budget(3)  # round 3 was planned at this sigma
    again.record(3, released=True, clients=4, clipping_norm=again.clipping_norm)
    assert again.next_round_exceeds_budget(4) and again.block()["epsilon"] <= 10.0


def test_release_noises_at_the_round_c_then_adapts_then_accounts_that_c():
    # The one order (common.privacy.mechanism.ClientLevelDP.release): the noise and the ledger row use
    # the C the clients clipped to; only the next round sees the adapted C.
    dp = ClientLevelDP(client_cfg(clipping="adaptive", clipped_count_stddev=1.5, noise_multiplier=1.0))
    c_round = dp.clipping_norm
    total = {k: v.to(torch.float64) for k, v in zeros().items()}
    # 40 clients, none fit: the noised fraction (N(0, 1.5) / 40) stays below the target quantile,
    # so C grows. With 4 clients the count's noise alone shrank C in about one run in ten.
    step = dp.release(total, fits=0.0, n_planned=40, server_round=1, clients=40)
    values = torch.cat([v.flatten() for v in step.values()])
    assert abs(float(values.std()) / (dp.noise.update_sigma * c_round / 40) - 1) < 0.05
    assert dp.clipping_norm > c_round  # nothing fit: C grows for the next round
    assert dp.per_round[-1] == {
        "round": 1,
        "epsilon": dp.epsilon_after(1),
        "released": True,
        "releases": 1,
        "clients_contributed": 40,
        "clipping_norm": c_round,
    }
    dp.skip(2, clients=1)
    assert dp.releases == 1 and dp.per_round[-1]["released"] is False
    assert dp.per_round[-1]["epsilon"] == dp.epsilon_after(1)
