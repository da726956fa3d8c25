"""The one-run audit bound (common/audit.py) on cases whose answer is known."""

import math
import random

import pytest

from common.audit import audit, epsilon_lower_bound, guesses, p_correct, tail


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
