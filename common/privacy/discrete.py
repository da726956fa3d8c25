"""Distributed DP's analysis: the Skellam mechanism on an exact integer sum.

With ``privacy.sample.noise=distributed`` every release is a sum over clients under SecAgg+:
each client sends integers (its examples' scaled, randomly rounded contributions) plus a share
of Skellam noise, and the server learns only the exact integer sum. A sum of independent
Skellams is Skellam, so with at least ``n_min`` honest shares of variance μ / n_min each the sum
carries Skellam noise of variance ≥ μ on every coordinate: one release's noise, whatever the
number of clients.

Privacy caveats, stated plainly:
- ε "against the server" trusts SecAgg+ (fewer than its threshold collude with the server)
  and at least ``n_min`` honest shares in every released sum. ``epsilon_local`` trusts nothing:
  it is the ε of the client's own message, its share alone.
- The bound is the Skellam mechanism's RDP (Agarwal, Kairouz & Liu, NeurIPS 2021, Theorem 3.5),
  with Poisson subsampling through Zhu & Wang's general upper bound (ICML 2019, Theorem 6),
  composed at integer orders and converted as Opacus converts. It is above the Gaussian ε of
  the same σ (``sigma_equivalent``) and approaches it as the granularity grows.
- One example's contribution is its clipped vector times ``scale``, randomly rounded to
  integers with the norm conditioned to at most :func:`rounded_norm_bound`; that bound, not the
  clipping norm, is the sensitivity accounted (and an integer vector's L1 norm is at most its
  squared L2 norm).

Derivations and the numbers: docs/privacy.md ("Distributed noise").
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.special import gammaln, logsumexp

# A share alone (epsilon_local) has a large ε whose best order is 2, the smallest integer order:
# the bound is still valid (conservative), and the report names the orders used.
warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")

#: SecAgg+ sums modulo MODULUS = 2**31; each client's vector is handed over as integers in
#: [−CLIENT_RANGE/2, CLIENT_RANGE/2), CLIENT_RANGE = 2**30, which Flower's quantiser (through int32,
#: and its modulus must exceed its quantisation range) maps exactly (server.round.secagg, client.secagg).
MODULUS_BITS = 31
MODULUS = 1 << MODULUS_BITS
CLIENT_RANGE = 1 << (MODULUS_BITS - 1)
#: Integer RDP orders: Zhu & Wang's subsampling bound holds at integer orders only.
ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)
#: Conditional rounding redraws a rounding whose norm exceeds the bound; β is the bound's
#: one-draw failure probability (Agarwal et al. 2021, and Kairouz et al. 2021, Appendix).
ROUNDING_BETA = math.exp(-0.5)
MECHANISM = "skellam"


def rounded_norm_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """L2 bound after conditional randomised rounding of a vector of norm ≤ ``norm`` with
    ``dim`` non-zero coordinates: min(norm + √dim, √(norm² + dim/4 + √(2 ln 1/β)(norm + √dim/2)))."""
    if dim < 1 or not norm > 0:
        raise ValueError("dim must be >= 1 and norm > 0")
    plain = norm + math.sqrt(dim)
    conditioned = math.sqrt(norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2))
    return min(plain, conditioned)


@dataclass(frozen=True)
class Sensitivity:
    """One example's L2 and L1 sensitivity in integer units, after rounding."""

    l2: float
    l1: float

    @classmethod
    def of(cls, units: float, dim: int, count_units: int = 0) -> "Sensitivity":
        """``units``: one example's clipped norm in integer units (granularity); ``dim``: its
        non-zero coordinates; ``count_units``: an exact integer it adds to a count coordinate."""
        bound = rounded_norm_bound(float(units), int(dim))
        l1 = min(bound**2, math.sqrt(dim) * bound)  # integers: |v| <= v^2
        return cls(math.sqrt(bound**2 + count_units**2), l1 + count_units)


@dataclass(frozen=True)
class SkellamEntry:
    """``steps`` releases of one Skellam sum mechanism, as a ledger and a report record them.

    ``mu``: the noise variance per coordinate of the sum (n_min shares of ``mu / n_min``);
    ``l2``, ``l1``: one example's sensitivity in the same integer units; ``q``: its Poisson
    sampling rate per release (1: every example is in it).
    """

    q: float
    steps: int
    mu: float
    l2: float
    l1: float
    n_min: int

    @property
    def sigma_equivalent(self) -> float:
        """The Gaussian noise multiplier of the same variance: √μ / Δ2 (the report's ``history``)."""
        return math.sqrt(self.mu) / self.l2

    @property
    def share_mu(self) -> float:
        """The variance one client adds."""
        return self.mu / self.n_min

    def gaussian(self) -> tuple[float, float, int]:
        """This entry as an Opacus history entry at its Gaussian-equivalent σ (a lower bound on its ε)."""
        return (self.sigma_equivalent, float(self.q), int(self.steps))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "SkellamEntry":
        return cls(
            float(raw["q"]), int(raw["steps"]), float(raw["mu"]), float(raw["l2"]), float(raw["l1"]), int(raw["n_min"])
        )

    def same_mechanism(self, other: "SkellamEntry") -> bool:
        return (self.q, self.mu, self.l2, self.l1, self.n_min) == (other.q, other.mu, other.l2, other.l1, other.n_min)


def skellam_rdp(alpha: int, mu: float, l2: float, l1: float) -> float:
    """RDP of order ``alpha`` (an integer > 1) of Skellam noise of variance ``mu`` per coordinate
    on integer vectors of sensitivity ``l2``/``l1`` (Agarwal et al. 2021, Theorem 3.5)."""
    lead = alpha * l2**2 / (2 * mu)
    return lead + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def subsampled_rdp(alpha: int, q: float, rdp) -> float:
    """RDP of order ``alpha`` after Poisson subsampling at ``q`` of a mechanism whose RDP is
    ``rdp(order)``: Zhu & Wang's general upper bound (2019, Theorem 6), capped by ``rdp(alpha)``."""
    if q >= 1:
        return rdp(alpha)
    if q <= 0:
        return 0.0
    a = int(alpha)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * log_1q + math.log(a * q - q + 1), _log_comb(a, 2) + 2 * log_q + (a - 2) * log_1q + rdp(2)]
    weights = [1.0, 1.0]
    for j in range(3, a + 1):
        terms.append(_log_comb(a, j) + j * log_q + (a - j) * log_1q + (j - 1) * rdp(j))
        weights.append(3.0)
    bound = float(logsumexp(terms, b=weights)) / (a - 1)
    return min(bound, rdp(a))


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


@functools.lru_cache(maxsize=4096)
def _entry_rdp(q: float, mu: float, l2: float, l1: float) -> np.ndarray:
    def base(order: int) -> float:
        return skellam_rdp(order, mu, l2, l1)

    out = np.array([subsampled_rdp(order, q, base) for order in ORDERS])
    out.setflags(write=False)
    return out


def entry_rdp(entry: SkellamEntry, *, local: bool = False) -> np.ndarray:
    """RDP at :data:`ORDERS` of ``entry``'s steps: of the sum, or (``local``) of one client's share alone."""
    mu = entry.share_mu if local else entry.mu
    return _entry_rdp(float(entry.q), float(mu), float(entry.l2), float(entry.l1)) * int(entry.steps)


@functools.lru_cache(maxsize=4096)
def _gaussian_rdp(q: float, sigma: float) -> np.ndarray:
    out = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)), dtype=float)
    out.setflags(write=False)
    return out


def composed_epsilon(
    gaussian: Iterable[Sequence], discrete: Iterable[SkellamEntry], delta: float, *, local: bool = False
) -> float:
    """ε at ``delta`` of Gaussian history entries (σ, q, steps) composed with Skellam entries,
    at the integer :data:`ORDERS` (Opacus' conversion). ``local``: each Skellam entry at one share."""
    rdp = np.zeros(len(ORDERS))
    empty = True
    for sigma, q, steps in gaussian:
        rdp = rdp + _gaussian_rdp(float(q), float(sigma)) * int(steps)
        empty = False
    for entry in discrete:
        rdp = rdp + entry_rdp(entry, local=local)
        empty = False
    if empty:
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def append_entry(entries: Iterable[SkellamEntry], new: SkellamEntry) -> list[SkellamEntry]:
    """``entries`` followed by ``new``, merged into the last one when it is the same mechanism."""
    out = list(entries)
    if new.steps <= 0:
        return out
    if out and out[-1].same_mechanism(new):
        last = out[-1]
        out[-1] = SkellamEntry(last.q, last.steps + new.steps, last.mu, last.l2, last.l1, last.n_min)
    else:
        out.append(new)
    return out


def entries_prefix(entries: Iterable[SkellamEntry], steps: int) -> list[SkellamEntry]:
    """The first ``steps`` releases of ``entries`` (ValueError when it holds fewer)."""
    entries, steps = list(entries), int(steps)
    if steps < 0 or steps > sum(e.steps for e in entries):
        raise ValueError(f"{steps} releases is not a prefix of {sum(e.steps for e in entries)}")
    out = []
    for e in entries:
        if steps <= 0:
            break
        out.append(SkellamEntry(e.q, min(e.steps, steps), e.mu, e.l2, e.l1, e.n_min))
        steps -= e.steps
    return out


def calibrate_sigma(
    *,
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    sensitivity: Sensitivity,
    n_min: int,
    prior_gaussian: Sequence = (),
    prior_discrete: Sequence[SkellamEntry] = (),
    tolerance: float = 0.01,
) -> float | None:
    """The smallest Gaussian-equivalent σ (within ``tolerance`` in ε) whose ``steps`` Skellam
    releases, after the prior spend, stay within ``target_epsilon``; None when the prior alone
    reaches it."""
    prior_g = tuple(tuple(h) for h in prior_gaussian)
    prior_d = tuple(prior_discrete)
    return _calibrate(
        float(target_epsilon), float(delta), float(q), int(steps), sensitivity, int(n_min), prior_g, prior_d, tolerance
    )


@functools.lru_cache(maxsize=256)
def _calibrate(target, delta, q, steps, sens, n_min, prior_g, prior_d, tolerance) -> float | None:
    if (prior_g or prior_d) and composed_epsilon(prior_g, prior_d, delta) >= target - tolerance:
        return None

    def eps_at(sigma: float) -> float:
        entry = SkellamEntry(q, steps, (sigma * sens.l2) ** 2, sens.l2, sens.l1, n_min)
        return composed_epsilon(prior_g, [*prior_d, entry], delta)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return None
    while target - eps_at(hi) > tolerance and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if eps_at(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def entry_for(sigma: float, *, q: float, steps: int, sensitivity: Sensitivity, n_min: int) -> SkellamEntry:
    """The Skellam entry of ``steps`` releases at Gaussian-equivalent ``sigma``."""
    return SkellamEntry(
        float(q), int(steps), (float(sigma) * sensitivity.l2) ** 2, sensitivity.l2, sensitivity.l1, n_min
    )
