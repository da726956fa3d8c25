"""Distributed noise's analysis and its client half, against references written here.

The Skellam bound (Agarwal, Kairouz & Liu 2021, Theorem 3.5) and Zhu & Wang's subsampling bound
(2019, Theorem 6) are re-implemented in this file from the papers' formulas, term by term, with
Python's own ``math`` (no numpy, no scipy); the conversion to (ε, δ) is Opacus'.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import stats

from client.training.distributed import conditional_round, skellam_share
from common.privacy.accounting import epsilon, spent_epsilon
from common.privacy.discrete import (
    CLIENT_RANGE,
    MODULUS,
    ORDERS,
    Sensitivity,
    SkellamEntry,
    composed_epsilon,
    entry_for,
    rounded_norm_bound,
    skellam_rdp,
    subsampled_rdp,
)

DELTA = 1e-5


def reference_skellam(alpha: int, mu: float, l2: float, l1: float) -> float:
    # Theorem 3.5: alpha D2^2/(2 mu) + min(((2 alpha - 1) D2^2 + 6 D1)/(4 mu^2), 3 D1/(2 mu))
    return alpha * l2 * l2 / (2.0 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4.0 * mu * mu), 1.5 * l1 / mu)


def reference_subsampled(alpha: int, q: float, base) -> float:
    # Theorem 6: (alpha-1) eps'(alpha) <= log{(1-q)^(alpha-1)(alpha q - q + 1)
    #   + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)} + 3 sum_{l>=3} C(alpha,l) (1-q)^(alpha-l) q^l e^{(l-1) eps(l)}}
    # Each term as a logarithm (the exponentials overflow), summed as max + log(sum of exp(t - max)).
    logs = [
        (alpha - 1) * math.log(1 - q) + math.log(alpha * q - q + 1),
        math.log(math.comb(alpha, 2)) + 2 * math.log(q) + (alpha - 2) * math.log(1 - q) + base(2),
    ]
    for ell in range(3, alpha + 1):
        logs.append(
            math.log(3 * math.comb(alpha, ell))
            + (alpha - ell) * math.log(1 - q)
            + ell * math.log(q)
            + (ell - 1) * base(ell)
        )
    top = max(logs)
    total = top + math.log(sum(math.exp(t - top) for t in logs))
    return min(total / (alpha - 1), base(alpha))


def reference_epsilon(entries: list[dict], delta: float, *, local: bool = False) -> float:
    """ε of a report's ``discrete`` entries, from the papers' formulas and Opacus' conversion."""
    orders = list(ORDERS)
    rdp = []
    for alpha in orders:
        total = 0.0
        for e in entries:
            mu = e["mu"] / e["n_min"] if local else e["mu"]

            def base(a, mu=mu, e=e):
                return reference_skellam(a, mu, e["l2"], e["l1"])

            total += e["steps"] * (base(alpha) if e["q"] >= 1 else reference_subsampled(alpha, e["q"], base))
        rdp.append(total)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_skellam_bound_matches_the_papers_formula():
    for alpha, mu, l2, l1 in [(2, 1e6, 1000.0, 2e4), (17, 3e5, 512.0, 9e3), (256, 4e9, 1030.0, 1.7e5)]:
        assert skellam_rdp(alpha, mu, l2, l1) == pytest.approx(reference_skellam(alpha, mu, l2, l1), rel=1e-12)


def test_subsampling_bound_matches_zhu_and_wang():
    def base(a):
        return reference_skellam(a, 4e6, 1000.0, 3e4)

    for alpha in (2, 3, 10, 40):
        for q in (0.01, 0.1, 0.5):
            assert subsampled_rdp(alpha, q, base) == pytest.approx(reference_subsampled(alpha, q, base), rel=1e-9)


def test_subsampling_bound_is_above_the_exact_subsampled_gaussian():
    # An upper bound for every mechanism: on the Gaussian it must not undercut Opacus' exact value.
    sigma = 1.3

    def gaussian(a):
        return a / (2 * sigma**2)

    for alpha in (2, 5, 20, 64):
        for q in (0.02, 0.25, 0.7):
            exact = float(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])
            assert subsampled_rdp(alpha, q, gaussian) >= exact * (1 - 1e-9)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 6.0])
def test_skellam_approaches_the_gaussian_as_the_scale_grows(sigma):
    gaussian = epsilon([(sigma, 1.0, 3)], DELTA)  # Opacus' orders
    same_orders = composed_epsilon([(sigma, 1.0, 3)], [], DELTA)  # the Gaussian at the integer orders used here
    gaps = []
    for units in (16, 256, 4096, 65536):
        sens = Sensitivity.of(units, 384)
        eps = composed_epsilon([], [entry_for(sigma, q=1.0, steps=3, sensitivity=sens, n_min=1)], DELTA)
        assert eps >= gaussian * (1 - 1e-6)  # never below the Gaussian of the same sigma
        gaps.append(eps - same_orders)
    assert gaps == sorted(gaps, reverse=True) and 0 <= gaps[-1] < 1e-4 * same_orders


def test_report_style_recompute_and_the_local_epsilon():
    sens = Sensitivity.of(1024, 77 * 385, count_units=256)
    entries = [
        entry_for(1.2, q=1.0, steps=1, sensitivity=Sensitivity.of(1024, 384), n_min=9),
        entry_for(2.5, q=0.3, steps=7, sensitivity=sens, n_min=9),
    ]
    raw = [e.to_json() for e in entries]
    assert spent_epsilon([], entries, DELTA, "rdp") == pytest.approx(reference_epsilon(raw, DELTA), rel=1e-9)
    local = spent_epsilon([], entries, DELTA, "rdp", local=True)
    assert local == pytest.approx(reference_epsilon(raw, DELTA, local=True), rel=1e-9)
    assert local > 2 * spent_epsilon([], entries, DELTA, "rdp")
    # The Gaussian equivalents, through Opacus itself, never give more than the reported ε.
    acc = RDPAccountant()
    acc.history = [e.gaussian() for e in entries]
    assert acc.get_epsilon(DELTA) <= spent_epsilon([], entries, DELTA, "rdp")


def test_without_discrete_releases_epsilon_is_the_local_one_bit_for_bit():
    history = [(0.71, 0.016, 120), (1.1, 1.0, 1)]
    assert spent_epsilon(history, [], DELTA, "rdp") == epsilon(history, DELTA, "rdp")
    assert spent_epsilon(history, [], DELTA, "rdp", local=True) == epsilon(history, DELTA, "rdp")


def test_summed_shares_have_the_planned_skellam_law():
    rng = np.random.default_rng(1)
    mu, n_min, draws = 8.0, 4, 200_000
    shares = [skellam_share((draws,), mu / n_min, rng).numpy() for _ in range(n_min)]
    each_var = [float(s.var()) for s in shares]
    assert each_var == pytest.approx([mu / n_min] * n_min, rel=0.03)
    total = np.sum(shares, axis=0)
    assert total.dtype == np.int64 and abs(total.mean()) < 0.03
    # The exact integer law of the sum: Skellam with both Poisson means mu/2.
    values, counts = np.unique(total, return_counts=True)
    expected = stats.skellam.pmf(values, mu / 2, mu / 2) * draws
    keep = expected > 50
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1)


def test_conditional_rounding_is_unbiased_and_within_its_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * 100.0
    bound = rounded_norm_bound(100.0, 300)
    draws = torch.stack([conditional_round(x, bound, gen) for _ in range(200)]).to(torch.float64)
    assert draws.dtype == torch.float64 and (draws.norm(dim=2) <= bound).all()
    assert (draws.mean(dim=0) - x).abs().max() < 0.15  # unbiased up to the conditioning


def test_a_vector_at_the_edge_of_the_range_sums_exactly_through_flowers_secagg_arithmetic():
    from client.secagg import exact_vector
    from server.round.secagg import exact_sum

    # Each coordinate of each client at the edge of its exact range; every sum inside the modulus.
    edge = CLIENT_RANGE // 2 - 1
    clients = [
        {"w": torch.tensor([edge, -edge, 5, -(edge)], dtype=torch.int64), "fedpriv.count": torch.tensor([edge])},
        {"w": torch.tensor([edge, -edge, -7, -(edge)], dtype=torch.int64), "fedpriv.count": torch.tensor([3])},
        {"w": torch.tensor([-1, 0, 2, 3], dtype=torch.int64), "fedpriv.count": torch.tensor([-4])},
    ]
    like = {"w": torch.zeros(4)}
    total = None
    for c in clients:
        vec = exact_vector(c, like, ["w"])
        # Flower's client side (secaggplus_mod's fit stage): weight 1 of max weight R, then quantise.
        ratio = 1 / CLIENT_RANGE
        q_ratio = round(ratio * CLIENT_RANGE)
        quantised = factor_combine(q_ratio, quantize([v * (q_ratio / CLIENT_RANGE) for v in vec], 0.5, CLIENT_RANGE))
        total = quantised if total is None else [a + b for a, b in zip(total, quantised)]
    total = parameters_mod(total, MODULUS)
    # Flower's unmask stage.
    q_total, rest = total[0][0], total[1:]
    mean = [
        v * (CLIENT_RANGE / q_total)
        for v in (a + -(len(clients) - 1) * 0.5 for a in dequantize(rest, 0.5, CLIENT_RANGE))
    ]
    sums = [exact_sum(m, len(clients)) for m in mean]
    want_w = sum(c["w"] for c in clients).numpy()
    assert (sums[0] == want_w).all()
    assert int(sums[1][0]) == edge + 3 - 4


def test_a_coordinate_beyond_the_exact_range_is_refused_not_wrapped():
    from client.secagg import exact_vector

    with pytest.raises(ValueError, match="exact range"):
        exact_vector(
            {"w": torch.tensor([CLIENT_RANGE // 2]), "fedpriv.count": torch.tensor([0])}, {"w": torch.zeros(1)}, ["w"]
        )


def test_entries_survive_json():
    e = SkellamEntry(0.5, 3, 1e6, 1030.2, 2.2e4, 9)
    assert SkellamEntry.from_json(e.to_json()) == e
