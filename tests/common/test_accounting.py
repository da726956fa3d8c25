"""Accounting checked against Opacus itself, the independent reference."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.errors import ConfigError
from common.privacy.accounting import (
    append_steps,
    calibrate_noise,
    epsilon,
    make_accountant,
    sample_rate,
    steps_per_epoch,
)


def opacus_rdp(history, delta):
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta)


def test_design_example_values():
    # DESIGN.md: (0.71, 0.016, 120) gives 4.0704, its first 30 steps 3.2018.
    assert round(epsilon([[0.71, 0.016, 120]], 1e-5), 4) == 4.0704
    assert round(epsilon([[0.71, 0.016, 30]], 1e-5), 4) == 3.2018


def test_stack_reference_values():
    # STACK.md: sigma=1.0, q=0.01, 1000 steps, delta=1e-5 -> RDP 2.101, PRV 1.838.
    assert epsilon([(1.0, 0.01, 1000)], 1e-5, "rdp") == pytest.approx(2.101, abs=1e-3)
    assert epsilon([(1.0, 0.01, 1000)], 1e-5, "prv") == pytest.approx(1.838, abs=2e-2)


def test_epsilon_equals_opacus_on_mixed_history():
    history = [(1.3, 0.02, 50), (0.9, 0.05, 20), (1.3, 0.02, 10)]
    assert epsilon(history, 1e-6) == opacus_rdp(history, 1e-6)
    prv = PRVAccountant()
    prv.history = list(history)
    assert epsilon(history, 1e-6, "prv") == prv.get_epsilon(1e-6)


def test_empty_history_has_spent_nothing():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([], 1e-5, "prv") == 0.0


def test_append_merges_like_opacus():
    # Opacus' accountant merges consecutive steps with equal (sigma, q).
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=0.8, sample_rate=0.1)
    hist = append_steps([], 0.8, 0.1, 2)
    hist = append_steps(hist, 0.8, 0.1, 1)
    assert hist == acc.history == [(0.8, 0.1, 3)]
    assert append_steps(hist, 0.9, 0.1, 1) == [(0.8, 0.1, 3), (0.9, 0.1, 1)]


def test_planned_sampling_is_what_opacus_runs_and_accounts_for_every_n_up_to_3000():
    # make_private wraps the loader in DPDataLoader.from_data_loader, runs len(dp_loader)
    # batches per epoch and accounts q = 1 / len(dp_loader) (opacus/privacy_engine.py).
    # For 153 batch counts below 3000 (93, 99, ...) that is one batch fewer than ceil(n / B).
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    short = set()
    for batch in (8, 32, 64):
        for n in range(1, 3001):
            loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
            dp_loader = DPDataLoader.from_data_loader(loader)
            assert steps_per_epoch(n, batch) == len(dp_loader), (n, batch)
            assert sample_rate(n, batch) == 1 / len(dp_loader), (n, batch)
            assert sample_rate(n, batch) >= dp_loader.sample_rate  # never below the true inclusion rate
            if len(dp_loader) < len(loader):
                short.add(len(loader))
    assert {93, 99, 105, 117} <= short


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_hits_the_budget(accountant):
    q, steps, target = 0.05, 200, 3.0
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    spent = epsilon([(sigma, q, steps)], 1e-5, accountant)
    assert target - 0.02 <= spent <= target


def test_calibration_against_prior_spend_composes_not_subtracts():
    prior = [(0.9, 0.05, 100)]
    spent = epsilon(prior, 1e-5)
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=100, prior_history=prior)
    total = epsilon(append_steps(prior, sigma, 0.05, 100), 1e-5)
    assert spent < total <= 8.0
    assert total >= 8.0 - 0.02
    # Calibrating to (target - spent) from scratch would overshoot the run's budget.
    naive = calibrate_noise(target_epsilon=8.0 - spent, delta=1e-5, sample_rate=0.05, steps=100)
    assert epsilon(append_steps(prior, naive, 0.05, 100), 1e-5) != pytest.approx(total, abs=1e-3)


def test_calibration_with_spent_budget_returns_none():
    prior = [(0.5, 0.2, 500)]
    assert epsilon(prior, 1e-5) > 8
    assert calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=10, prior_history=prior) is None


def test_unknown_accountant_names_setting():
    with pytest.raises(ConfigError) as err:
        make_accountant("gdpx")
    assert err.value.setting == "privacy.sample.accountant"


def test_epsilon_grows_with_steps():
    values = [epsilon([(0.8, 0.05, k)], 1e-5) for k in (10, 50, 100, 400)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert all(math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- client level


def _gaussian_rdp_epsilon(sigma, rounds, delta):
    """Independent reference: RDP of `rounds` Gaussian mechanisms (q = 1) is rounds·α/(2σ²);
    converted to (ε, δ) with the bound Opacus uses (Balle et al. 2020), over Opacus' alphas."""
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for a in alphas:
        rdp = rounds * a / (2 * sigma**2)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


def test_client_epsilon_is_the_composed_gaussian_mechanism_at_q_one():
    from common.privacy.accounting import client_epsilon

    for sigma, rounds in [(0.76, 1), (0.76, 3), (2.0, 20)]:
        assert client_epsilon(sigma, rounds, 1e-3) == pytest.approx(
            _gaussian_rdp_epsilon(sigma, rounds, 1e-3), rel=1e-9
        )
    assert client_epsilon(1.0, 0, 1e-3) == 0.0
    per_round = [client_epsilon(1.0, r, 1e-3) for r in range(1, 6)]
    assert per_round == sorted(per_round) and len(set(per_round)) == 5


def test_client_noise_calibrates_to_the_budget_over_planned_rounds():
    from common.privacy.accounting import client_epsilon, client_noise

    cfg = {"clipping": "fixed", "noise_multiplier": None, "epsilon": 10.0, "delta": 1e-3}
    noise = client_noise(cfg, rounds=3, num_clients=4)
    assert noise.calibrated and 9.99 <= client_epsilon(noise.sigma, 3, 1e-3) <= 10.0
    assert client_noise({**cfg, "noise_multiplier": 1.5}, rounds=3, num_clients=4).sigma == 1.5


def test_adaptive_split_keeps_the_combined_sigma_and_refuses_a_too_small_count_noise():
    from common.errors import ConfigError
    from common.privacy.accounting import adaptive_noise_split, combined_noise_multiplier

    sigma_u = adaptive_noise_split(1.0, 2.0)
    # 0/1 bits: the count has sensitivity 1, so σ = (σ_u⁻² + σ_b⁻²)^-½ (no factor 2).
    assert combined_noise_multiplier(sigma_u, 2.0) == pytest.approx(1.0) and sigma_u > 1.0
    assert combined_noise_multiplier(2.0, 2.0) == pytest.approx(2**0.5)  # (¼ + ¼)^-½
    assert combined_noise_multiplier(2.0, 4.0, 2.0) == pytest.approx(2**0.5)  # the count: its noise / sensitivity
    assert combined_noise_multiplier(1.3, None) == 1.3  # fixed clipping: the update sum's σ alone
    with pytest.raises(ConfigError) as err:
        adaptive_noise_split(1.0, 1.0)
    assert err.value.setting == "privacy.client.clipped_count_stddev"


@pytest.mark.parametrize("history", [[(0.71, 0.016, 120)], [(1.3, 0.5, 7), (0.9, 0.25, 40), (1.3, 0.5, 3)]])
def test_fast_rdp_epsilon_is_opacus_bit_for_bit(history):
    # epsilon() caches per-step RDP; the value must stay exactly RDPAccountant's.
    for delta in (1e-5, 1e-3):
        assert epsilon(history, delta) == opacus_rdp(history, delta)
        assert epsilon(history, delta) == opacus_rdp(history, delta)  # cached path


@pytest.mark.parametrize("q,steps,target", [(0.5, 6, 8.0), (0.016, 120, 3.0)])
def test_calibration_is_opacus_get_noise_multiplier(q, steps, target):
    from opacus.accountants.utils import get_noise_multiplier

    expected = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp", epsilon_tolerance=0.01
    )
    assert calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps) == expected
