"""The one-run audit bound (common/privacy/audit_bounds.py) on cases whose answer is known."""

import math
import random

import pytest
import torch

from common.privacy.audit_bounds import (
    audit,
    epsilon_lower_bound,
    guesses,
    joint_scores,
    max_detectable_epsilon,
    p_correct,
    tail,
    verdict,
)


def test_all_guesses_right_gives_a_bound_that_grows_with_the_guesses():
    bounds = [epsilon_lower_bound(r, r) for r in (10, 50, 100, 500, 2000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    # r right of r rejects eps exactly when p(eps)^r <= 0.05.
    for r, eps in zip((10, 50, 100, 500, 2000), bounds):
        assert p_correct(eps) ** r == pytest.approx(0.05, rel=1e-4)
    assert epsilon_lower_bound(100, 100) > 3  # 100 perfect guesses: the power the issue asks for


def test_chance_level_guesses_give_about_zero():
    assert epsilon_lower_bound(100, 50) == 0.0
    assert epsilon_lower_bound(1000, 500) == 0.0
    assert epsilon_lower_bound(1000, 520) < 0.1


def test_the_bound_is_the_edge_of_rejection():
    r, v, beta = 200, 170, 0.05
    eps = epsilon_lower_bound(r, v)
    assert tail(r, v, eps) <= beta < tail(r, v, eps + 1e-3)


def test_delta_only_lowers_the_bound_and_a_large_delta_gives_zero():
    assert epsilon_lower_bound(100, 100, m=200, delta=1e-5) < epsilon_lower_bound(100, 100)
    assert epsilon_lower_bound(100, 100, m=200, delta=1e-3) == 0.0  # 2 m delta = 0.4 > beta


def test_the_bound_is_valid_for_an_eps_dp_mechanism():
    # Randomised response on each inclusion bit is exactly eps-DP per canary: the 95 %
    # lower bound may exceed eps in at most ~5 % of trials.
    eps, m, trials = 1.0, 200, 300
    rng = random.Random(7)
    p = math.exp(eps) / (1 + math.exp(eps))
    over = 0
    for _ in range(trials):
        bits = [rng.random() < 0.5 for _ in range(m)]
        scores = [(1.0 if (b if rng.random() < p else not b) else -1.0) + 1e-6 * rng.random() for b in bits]
        if audit(scores, bits, k_plus=m // 2, k_minus=m // 2, delta=0.0).epsilon_lower_bound > eps:
            over += 1
    assert over / trials <= 0.08


def test_guesses_take_the_extremes():
    scores = [0.9, 0.1, 0.5, 0.8, 0.2]
    included = [True, False, True, False, False]
    assert guesses(scores, included, 2, 2) == (4, 3)  # in: 0.9 ok, 0.8 wrong; out: 0.1 ok, 0.2 ok
    with pytest.raises(ValueError):
        guesses(scores, included, 3, 3)


def correlated_directions(k, dim, shared, seed=0):
    """k unit rows that all lean on one shared direction (as canaries of one label do)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)
    rows = torch.randn(k, dim, generator=g) + shared * common / common.norm() * dim**0.5
    return rows / rows.norm(dim=1, keepdim=True)


def test_joint_scores_recover_a_sum_of_directions_that_projection_confuses():
    d = correlated_directions(40, 500, shared=1.0)
    included = torch.arange(40) % 3 == 0
    coef = torch.where(included, 1.0 + torch.rand(40), torch.zeros(40))
    update = coef @ d
    fitted = joint_scores(d, update, ridge=1e-8)
    torch.testing.assert_close(fitted, coef, atol=1e-4, rtol=1e-4)
    # The plain projection gives the excluded rows the shared component too; the fit does not.
    projected = d @ update
    assert projected[~included].min() > 0.5 * projected[included].min()
    assert fitted[~included].abs().max() < 1e-3 < fitted[included].min()


def test_joint_scores_are_linear_and_zero_without_update():
    d = correlated_directions(10, 50, shared=0.5, seed=1)
    u, v = torch.randn(50), torch.randn(50)
    assert torch.count_nonzero(joint_scores(d, torch.zeros(50))) == 0
    torch.testing.assert_close(
        joint_scores(d, 2 * u - v), 2 * joint_scores(d, u) - joint_scores(d, v), atol=1e-5, rtol=1e-5
    )


def test_joint_scores_stay_defined_for_repeated_directions():
    d = correlated_directions(5, 30, shared=0.0, seed=2)
    d = torch.cat([d, d[:1]])  # two identical canaries: the Gram matrix is singular
    fitted = joint_scores(d, d[0] * 2.0)
    assert torch.isfinite(fitted).all()
    assert fitted[0] == pytest.approx(fitted[-1]) and fitted[0] + fitted[-1] == pytest.approx(2.0, rel=1e-2)
    with pytest.raises(ValueError):
        joint_scores(d, torch.zeros(29))


def test_max_detectable_is_the_bound_with_every_guess_right():
    assert max_detectable_epsilon(120, m=160, delta=1e-5) == pytest.approx(3.6557, abs=1e-3)
    assert max_detectable_epsilon(150, m=200, delta=1e-5) == pytest.approx(3.8757, abs=1e-3)
    assert max_detectable_epsilon(150, m=200) == pytest.approx(3.9034, abs=1e-3)  # the 3.90 (δ = 0)
    found = audit([float(i) for i in range(160)], [i >= 80 for i in range(160)], k_plus=60, k_minus=60, delta=1e-5)
    assert found.correct == 120 and found.epsilon_lower_bound == found.max_detectable_epsilon


def test_at_the_default_epsilon_consistent_needs_thousands_of_guesses():
    # δ = 0: 8,932 perfect guesses show ε = 8. With the 2mδ term at δ = 1e-5 nothing does.
    assert max_detectable_epsilon(8931) < 8 <= max_detectable_epsilon(8932)
    assert max(max_detectable_epsilon(m, m=m, delta=1e-5) for m in range(500, 2600, 100)) < 6.1


@pytest.mark.parametrize(
    "bound, power, accounted, expected",
    [
        (0.15, 3.66, 7.99, "inconclusive"),  # DP on at the power preset: 3.66 cannot show 7.99
        (3.66, 3.66, math.inf, "inconclusive"),  # noise off: nothing exceeds infinity, nothing confirms it
        (0.0, 3.88, 8.0, "inconclusive"),  # the defaults
        (1.0, 6.0, 2.0, "consistent"),  # could have shown 2, did not exceed it
        (2.0, 6.0, 2.0, "consistent"),
        (2.5, 6.0, 2.0, "exceeds"),
        (3.0, 3.66, 2.0, "exceeds"),
        (3.5, 3.66, 8.0, "inconclusive"),
    ],
)
def test_verdict_is_never_consistent_below_the_power(bound, power, accounted, expected):
    assert verdict(bound, power, accounted) == expected
    if power < accounted:
        assert verdict(bound, power, accounted) != "consistent"
