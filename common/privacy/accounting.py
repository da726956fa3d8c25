"""Privacy accounting, sample level and client level: the one place where ε is computed.

Everything here is a thin, deterministic layer over Opacus' accountants so that
anyone holding a report can recompute its numbers with Opacus alone:

    acc = RDPAccountant(); acc.history = [tuple(h) for h in history]
    acc.get_epsilon(delta)

A *history* is exactly Opacus' accountant history: a list of
``(noise_multiplier, sample_rate, steps)`` entries, consecutive equal
``(sigma, q)`` pairs merged as Opacus merges them.

Sampling: :func:`steps_per_epoch` asks Opacus' own sampler how many batches it draws,
and :func:`sample_rate` is the q its accountant records, so the (q, steps) planned and
checked against budgets are exactly the ones Opacus runs and records (which are not
always ``ceil(n / batch_size)`` batches: docs/privacy.md).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from common.errors import ConfigError
from common.privacy.discrete import SkellamEntry, composed_epsilon

# Opacus warns when the best RDP order is the largest default alpha (large sigma). The
# bound is still valid; DESIGN.md fixes the default alphas so anyone can recompute it.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}

HistoryEntry = tuple[float, float, int]


def make_accountant(name: str, history: Iterable[Sequence] = ()) -> IAccountant:
    """An Opacus accountant of kind ``name`` preloaded with ``history``."""
    if name not in ACCOUNTANTS:
        raise ConfigError(
            "privacy.sample.accountant",
            f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}",
        )
    accountant = ACCOUNTANTS[name]()
    accountant.history = normalise(history)
    return accountant


def normalise(history: Iterable[Sequence]) -> list[HistoryEntry]:
    """JSON lists back to Opacus' tuples (float, float, int)."""
    return [(float(s), float(q), int(n)) for s, q, n in history]


def epsilon(history: Iterable[Sequence], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` spent by ``history``; an empty history has spent nothing.

    For ``rdp`` this is ``RDPAccountant.get_epsilon`` computed the same way, bit for bit
    (per-step RDP of each (σ, q) times its steps, summed in history order, then Opacus'
    conversion), with the per-step RDP of a (σ, q) pair computed once per process: it
    is pure-Python over ~100 orders and cost ~0.3 s a call, which every client paid
    several times per round.
    """
    hist = normalise(history)
    if not hist:
        return 0.0
    if accountant == "rdp":
        alphas = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum([_rdp_per_step(q, sigma) * steps for sigma, q, steps in hist])
        eps, _ = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
        return float(eps)
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q), -inf at q = 1 (the prototype release)
        return float(make_accountant(accountant, hist).get_epsilon(delta))


def spent_epsilon(
    history: Iterable[Sequence], discrete: Iterable[SkellamEntry], delta: float, accountant: str, *, local: bool = False
) -> float:
    """ε at ``delta`` of a ledger: its Gaussian ``history`` composed with its distributed-noise
    ``discrete`` releases (``common.privacy.discrete``). ``local``: ε of the client's own messages
    alone (each discrete release at its share). Without discrete releases this is :func:`epsilon`,
    bit for bit, for both."""
    discrete = list(discrete)
    if not discrete:
        return epsilon(history, delta, accountant)
    if accountant != "rdp":
        raise ConfigError("privacy.sample.accountant", "distributed noise is accounted with RDP: use rdp")
    return composed_epsilon(normalise(history), discrete, delta, local=local)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(q: float, sigma: float) -> np.ndarray:
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def check_pins(pinned_delta: float | None, pinned_accountant: str | None, delta: float, accountant: str) -> None:
    """One δ and one accountant per ledger: refuse a run whose δ or accountant is not the pinned one.

    A ledger's spend is accounted at the δ and with the accountant of its first spend;
    ε at another δ is another number, so "ε never goes down" and the budget check only
    hold at that one. ``None`` (nothing spent yet) accepts any. Raises ConfigError
    naming ``privacy.sample.delta`` / ``privacy.sample.accountant`` and the ledger's value.
    """
    if pinned_delta is not None and float(delta) != float(pinned_delta):
        raise ConfigError(
            "privacy.sample.delta",
            f"{delta:g} differs from the delta {pinned_delta:g} this client's ledger is accounted "
            "at (one delta per ledger: use that delta, or another state_dir)",
        )
    if pinned_accountant is not None and accountant != pinned_accountant:
        raise ConfigError(
            "privacy.sample.accountant",
            f"{accountant!r} differs from the accountant {pinned_accountant!r} this client's "
            "ledger is accounted with (use that accountant, or another state_dir)",
        )


def append_steps(history: Iterable[Sequence], sigma: float, q: float, steps: int) -> list[HistoryEntry]:
    """``history`` followed by ``steps`` steps at ``(sigma, q)``, merged as Opacus does."""
    hist = normalise(history)
    if steps <= 0:
        return hist
    if hist and hist[-1][0] == sigma and hist[-1][1] == q:
        s, qq, n = hist[-1]
        hist[-1] = (s, qq, n + int(steps))
    else:
        hist.append((float(sigma), float(q), int(steps)))
    return hist


#: The prototype release (common.recipe, client.training.dp_train.release_prototypes): one class
#: sum per class of unit-norm features, one class per example. Adding or removing one
#: example changes one row of the K × d sums by a vector of norm <= 1, so the release's L2
#: sensitivity is 1 and its noise std is σ × 1 on every entry, empty classes included.
PROTOTYPE_SENSITIVITY = 1.0
PROTOTYPE_SAMPLE_RATE = 1.0  # every example is in the release: no amplification is claimed


def prototype_entry(sigma: float) -> HistoryEntry:
    """The history entry of one prototype release: the Gaussian mechanism once, at q = 1.

    Every example is in the release (no sampling, no amplification claimed); Opacus'
    accountants take a (σ, q = 1, 1 step) entry as exactly that mechanism.
    """
    return (float(sigma), PROTOTYPE_SAMPLE_RATE, 1)


def train_batch_size(train: Mapping, n: int, *, private: bool = True) -> int:
    """The expected Poisson batch size on a client with ``n`` examples.

    ``train.batch_size`` when set (an explicit value always wins); else
    ``train.sample_rate`` × n, rounded, at least 1 and at most n, where a null
    sample_rate is ``train.sample_rate_dp`` under sample-level DP (``private``), else
    ``train.sample_rate_no_dp``. The accounted q is then ``sample_rate(n, B)``, as always.
    """
    if train["batch_size"] is not None:
        return int(train["batch_size"])
    rate = train["sample_rate"]
    if rate is None:
        rate = train["sample_rate_dp"] if private else train["sample_rate_no_dp"]
    return max(1, min(int(n), round(float(rate) * int(n))))


@functools.lru_cache(maxsize=4096)
def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of Poisson batches Opacus draws per epoch over ``n`` examples.

    ``DPDataLoader.from_data_loader`` samples at ``1 / len(loader)`` (``ceil(n / B)``
    batches without drop_last) and its sampler yields ``int(1 / rate)`` batches: asked
    of Opacus' sampler itself rather than re-derived, so a change there shows up here.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    return len(UniformWithReplacementSampler(num_samples=int(n), sample_rate=1 / math.ceil(n / batch_size)))


def sample_rate(n: int, batch_size: int) -> float:
    """The q Opacus' accountant records for ``n`` examples at ``batch_size``: ``1 / len(dp_loader)``.

    It is at least the true inclusion probability ``1 / ceil(n / B)`` (equal for most n),
    so accounting at it is exact or conservative.
    """
    return 1 / steps_per_epoch(n, batch_size)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior_history: Iterable[Sequence] = (),
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float | None:
    """Smallest σ (within tolerance) such that ``prior + steps at (σ, q)`` stays ≤ target ε.

    With no prior spend this is Opacus' ``get_noise_multiplier``. With prior spend the
    budget is *not* ``target - ε_prior`` (ε does not add up linearly under RDP/PRV):
    we bisect σ on the composed history, which is what the accountant will see.
    Returns ``None`` when the prior spend alone already reaches the target.
    """
    if steps <= 0:
        raise ValueError("steps must be positive")
    # Clients with the same (q, steps, prior) get the same σ: compute it once per process.
    return _calibrate(
        float(target_epsilon),
        float(delta),
        float(sample_rate),
        int(steps),
        tuple(normalise(prior_history)),
        accountant,
        float(epsilon_tolerance),
    )


@functools.lru_cache(maxsize=1024)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: tuple,
    accountant: str,
    epsilon_tolerance: float,
) -> float | None:
    prior = list(prior)
    if not prior:
        if accountant == "rdp":
            return _opacus_bisection(target_epsilon, delta, sample_rate, steps, epsilon_tolerance)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    if epsilon(prior, delta, accountant) >= target_epsilon - epsilon_tolerance:
        return None

    def eps_with(sigma: float) -> float:
        return epsilon(append_steps(prior, sigma, sample_rate, steps), delta, accountant)

    lo, hi = 0.0, 10.0
    while eps_with(hi) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            return None
    # Invariant: eps_with(hi) <= target. Stop when the ε at hi is within tolerance.
    while True:
        mid = (lo + hi) / 2
        if eps_with(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if target_epsilon - eps_with(hi) <= epsilon_tolerance or hi - lo < 1e-6:
            return hi


def _opacus_bisection(target_epsilon: float, delta: float, q: float, steps: int, tolerance: float) -> float:
    """Opacus' ``get_noise_multiplier`` search, step for step, on :func:`epsilon` (same values)."""
    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon([(sigma_high, q, steps)], delta, "rdp")
        if sigma_high > 1e6:  # opacus.accountants.utils.MAX_SIGMA
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon([(sigma, q, steps)], delta, "rdp")
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)


# --------------------------------------------------------------------------- client level
# Client-level DP (DP-FedAvg): each round releases sum(clipped updates) + N(0, (σC)²),
# a Gaussian mechanism of sensitivity C on add/remove-one-client neighbours. With a
# fixed number of clients asked per round (no Poisson sampling of clients), there is
# no amplification by sampling: every round is accounted at q = 1. The history has
# the same form as the sample level's, so Opacus recomputes it the same way:
#     acc = RDPAccountant(); acc.history = [(sigma, 1.0, rounds)]; acc.get_epsilon(delta)

CLIENT_SAMPLE_RATE = 1.0  # no amplification by client sampling is claimed
CLIENT_ACCOUNTANT = "rdp"


def client_history(sigma: float, rounds: int) -> list[HistoryEntry]:
    """The client-level accountant history after ``rounds`` released aggregates."""
    return append_steps([], sigma, CLIENT_SAMPLE_RATE, rounds)


def client_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Client-level ε at ``delta`` after ``rounds`` released aggregates at noise ``sigma``."""
    if rounds <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    return epsilon(client_history(sigma, rounds), delta, CLIENT_ACCOUNTANT)


def calibrate_client_noise(*, target_epsilon: float, delta: float, rounds: int) -> float:
    """Smallest σ (within 0.01 in ε) such that ``rounds`` releases stay within ``target_epsilon``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=CLIENT_SAMPLE_RATE,
            steps=rounds,
            accountant=CLIENT_ACCOUNTANT,
            epsilon_tolerance=0.01,
        )
    )


#: L2 sensitivity of the summed "fits under C" bits: each client sends 0 or 1, so adding
#: or removing one client moves the sum by up to 1 (not ½: the bits are not centred).
COUNT_SENSITIVITY = 1.0


def adaptive_noise_split(sigma: float, count_stddev: float) -> float:
    """Noise multiplier of the update sum when the clipped count is noised with ``count_stddev``.

    Releasing the update sum (sensitivity C, noise σ_Δ·C) and the count of clients whose
    update fit under C (sensitivity s = :data:`COUNT_SENSITIVITY`, noise std σ_b) is one
    Gaussian mechanism on the stacked vector [sum / C, count / s]: its noise multiplier
    is σ = (σ_Δ⁻² + (σ_b / s)⁻²)^(-1/2), so the update sum needs
    σ_Δ = (σ⁻² − (s / σ_b)²)^(-1/2), which needs σ < σ_b / s.

    Andrew et al. (2021) and TF-Privacy centre each bit to ±½ (sensitivity ½), which is
    where the factor 2 of Flower's ``compute_adaptive_noise_params`` comes from: for our
    0/1 bits it under-states ε (4 clients, budget 10, δ 1e-3: 14.5 spent). Not used.
    """
    effective = count_stddev / COUNT_SENSITIVITY
    if not sigma < effective:
        raise ConfigError(
            "privacy.client.clipped_count_stddev",
            f"{count_stddev:g} is too small for noise_multiplier {sigma:g}: it must be > sigma "
            f"(the count of fitting updates has sensitivity {COUNT_SENSITIVITY:g})",
        )
    return (sigma**-2 - effective**-2) ** -0.5


def combined_noise_multiplier(
    update_sigma: float, count_stddev: float | None, count_sensitivity: float | None = COUNT_SENSITIVITY
) -> float:
    """The one Gaussian mechanism's σ from its two releases (what the report lets anyone recompute)."""
    if count_stddev is None:
        return update_sigma
    return (update_sigma**-2 + (count_stddev / count_sensitivity) ** -2) ** -0.5


def client_level_sigma(mechanism: object) -> float:
    """σ_eff of a report's ``client_level.mechanism`` (DESIGN.md), the σ its ε follows from.

    ``update_noise_multiplier`` > 0, and ``count_stddev`` and ``count_sensitivity`` either
    both null (fixed clipping) or both > 0: then :func:`combined_noise_multiplier`. Raises
    ValueError naming what is missing or invalid, so nothing is recomputed from it.
    """
    if not isinstance(mechanism, Mapping):
        raise ValueError("client_level.mechanism is missing")
    sigma = _positive(mechanism.get("update_noise_multiplier"), "update_noise_multiplier")
    std, sens = mechanism.get("count_stddev"), mechanism.get("count_sensitivity")
    if std is None and sens is None:
        return combined_noise_multiplier(sigma, None)
    return combined_noise_multiplier(sigma, _positive(std, "count_stddev"), _positive(sens, "count_sensitivity"))


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"client_level.mechanism.{name} is {value!r}, not a number > 0")
    return float(value)


@dataclass(frozen=True)
class ClientNoise:
    """The client-level noise of a run, fixed before round 1."""

    sigma: float  # the noise multiplier the accountant uses
    calibrated: bool  # True when σ was calibrated from privacy.client.epsilon
    update_sigma: float  # noise multiplier of the update sum (= sigma with fixed clipping)
    count_stddev: float | None  # adaptive clipping: noise std of the clipped count


def client_noise(client_cfg: Mapping, *, rounds: int, num_clients: int) -> ClientNoise:
    """σ given (``privacy.client.noise_multiplier``) or calibrated from the budget and planned rounds."""
    given = client_cfg["noise_multiplier"]
    if given is None:
        sigma = calibrate_client_noise(
            target_epsilon=float(client_cfg["epsilon"]), delta=float(client_cfg["delta"]), rounds=rounds
        )
    else:
        sigma = float(given)
    if client_cfg["clipping"] != "adaptive":
        return ClientNoise(sigma, given is None, sigma, None)
    stddev = client_cfg["clipped_count_stddev"]
    # Default: the count gets at least twice the combined σ, so the update sum's own noise
    # is σ_Δ = σ / √(3/4) ≈ 1.15 σ (the same σ_Δ the former, wrong, ±½ split gave with σ_b = σ).
    stddev = max(num_clients / 20, 2 * sigma * COUNT_SENSITIVITY) if stddev is None else float(stddev)
    return ClientNoise(sigma, given is None, adaptive_noise_split(sigma, stddev), stddev)


def history_prefix(history: Iterable[Sequence], steps: int) -> list[HistoryEntry]:
    """The first ``steps`` steps of ``history`` (the last entry kept cut short if need be).

    ``history_prefix(h, n)`` is the history as it stood when it held ``n`` steps, so the
    ε after any round follows from the final history and that round's cumulative step
    count alone. Raises ValueError when ``steps`` is negative or more than ``history`` holds.
    """
    hist, steps = normalise(history), int(steps)
    if steps < 0 or steps > sum(n for _, _, n in hist):
        raise ValueError(f"{steps} steps is not a prefix of a history of {sum(n for _, _, n in hist)} steps")
    out: list[HistoryEntry] = []
    for sigma, q, n in hist:
        if steps <= 0:
            break
        out.append((sigma, q, min(n, steps)))
        steps -= n
    return out
