"""How many neighbours a SecAgg+ client shares with, and how many shares rebuild a secret.

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) replaces SecAgg's complete
graph with a sparse one: each client agrees pairwise masks with, and Shamir-shares its
two secrets (the self-mask seed and the mask key) among, only its neighbours. Flower's
workflow builds the graph as a random Harary graph: the sampled nodes are shuffled onto
a ring and each is joined to the ``k / 2`` nodes on either side (``num_shares = k + 1``
shares, one of them kept by the client itself). The cost of a round falls from O(n²) to
O(n k): Shamir splitting (each client, ∝ k·t), reconstruction (the server, ∝ t per
client with ``server.round.shamir``) and key agreement and mask expansion (∝ k per client).

:func:`neighbourhood` picks the smallest even degree ``k`` that the paper's analysis of
the random Harary graph admits (as its authors' own parameter finder does, Google's
``fcp/secagg``), for ``n`` sampled clients of which at most a fraction γ (``corrupt``)
collude with an honest-but-curious server and at most a fraction δ (``dropout``) drop
out mid-round, the colluders fixed before the ring is drawn and the dropouts independent
of it. A client's neighbours are then a uniformly random ``k`` of the ``n - 1`` others, so
the counts below are hypergeometric:

- security (failure ≤ 2^-40 over the round, split evenly between the two events below,
  union bound over the n clients):
  - no client has ``t`` or more colluding neighbours (else the colluders alone hold
    enough shares to rebuild its secrets; an honest client hands the server, for each
    neighbour, the share of its self-mask seed or of its key, never both):
    P[colluding neighbours ≥ t] ≤ 2^-41 / n;
  - the honest survivors stay connected once the colluding and dropped clients are
    removed (else the server learns the sums of the pieces): a Harary ring breaks only
    where k / 2 consecutive clients are all removed, in two places; union bound over the
    pairs of places, ≤ 2^-41;
- correctness (failure ≤ 2^-20): every client, a dropped one included, keeps ``t``
  surviving holders of its shares, so that the server can rebuild what it must (the
  survivors' self masks, the dropped clients' keys): P[surviving neighbours < t] ≤ 2^-20 / n.
  Beyond the assumed dropouts a round may halt; a halted round reveals nothing.

``t`` is the largest threshold correctness allows (the most colluders tolerated, where
the authors' finder takes the smallest secure one to save computation), and at least
the smallest secure one. Fractions of the n clients are rounded up (5 % of 10 clients is
one colluder, not none). When no ``k < n - 1`` satisfies all three (a small federation),
the graph is complete (every client shares with every other, SecAgg's setting): there
the colluders hold exactly ⌈γ n⌉ shares of an honest client's n and the survivors
n - ⌈δ n⌉, so ``t`` is n - ⌈δ n⌉, or ⌈γ n⌉ + 1 (at least 2) where that is larger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from common.errors import ConfigError

#: Statistical security: the server learns more than the sum with probability below 2^-40.
SECURITY_BITS = 40
#: Correctness: a round halts although no more than ``dropout`` of its clients left, below 2^-20.
CORRECTNESS_BITS = 20


@dataclass(frozen=True)
class Neighbourhood:
    """A SecAgg+ graph for ``sampled`` clients: ``degree`` neighbours each, ``num_shares = degree + 1``
    shares of each secret (one kept), any ``threshold`` of which rebuild it."""

    sampled: int
    degree: int
    threshold: int
    complete: bool  # every client is every other's neighbour (a federation too small for a sparse graph)

    @property
    def num_shares(self) -> int:
        return self.degree + 1

    @property
    def fraction(self) -> float:
        """``num_shares`` as the fraction of the sampled clients Flower takes (``round(fraction · n)``)."""
        return self.num_shares / self.sampled


def _log_hypergeom_pmf(population: int, marked: int, draws: int, x: int) -> float:
    return (
        _log_comb(marked, x) + _log_comb(population - marked, draws - x) - _log_comb(population, draws)
        if 0 <= x <= marked and 0 <= draws - x <= population - marked
        else -math.inf
    )


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_sum(logs: list[float]) -> float:
    top = max(logs, default=-math.inf)
    return -math.inf if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in logs))


def _tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """log P[X ≥ at_least] for X ~ Hypergeometric(population, marked, draws)."""
    return _log_sum([_log_hypergeom_pmf(population, marked, draws, x) for x in range(max(at_least, 0), draws + 1)])


def _head(population: int, marked: int, draws: int, below: int) -> float:
    """log P[X < below] for X ~ Hypergeometric(population, marked, draws)."""
    return _log_sum([_log_hypergeom_pmf(population, marked, draws, x) for x in range(0, min(below, draws + 1))])


def _thresholds(n: int, bad: int, gone: int, degree: int) -> tuple[int, int]:
    """(smallest secure t, largest correct t) for ``degree`` neighbours each, ``bad`` colluders and
    ``gone`` dropouts among the ``n`` clients. A client's neighbours are a uniformly random set of
    ``degree`` of the n - 1 others (the ring is shuffled), so the counts are hypergeometric; a
    dropped client (whose own share is gone too) is the worst case for correctness."""
    if degree >= n - 1:  # complete: exactly the colluders, and the n - gone survivors hold shares
        return max(2, bad + 1), n - gone
    secure_bound = -(SECURITY_BITS + 1) * math.log(2) - math.log(n)
    secure = next(t for t in range(1, degree + 2) if _tail(n - 1, bad, degree, t) <= secure_bound)
    correct_bound = -CORRECTNESS_BITS * math.log(2) - math.log(n)
    correct = max((t for t in range(1, degree + 1) if _head(n - 1, n - gone, degree, t) <= correct_bound), default=0)
    return max(2, secure), correct


def _disconnects(n: int, removed: int, degree: int) -> bool:
    """Whether removing ``removed`` random clients may split a random Harary ring of this degree
    with probability above 2^-(SECURITY_BITS+1): it takes two runs of degree/2 removed clients."""
    if degree > removed:
        return False
    log_pairs = math.log(n) + math.log(n - degree - 1) - math.log(2)
    log_all_removed = _log_comb(removed, degree) - _log_comb(n, degree)  # `degree` given clients all removed
    return log_pairs + log_all_removed >= -(SECURITY_BITS + 1) * math.log(2)


def _counts(n: int, corrupt: float, dropout: float) -> tuple[int, int]:
    """Colluders and dropouts among n clients, rounded up: a tenth of 4 clients is one, not none."""
    return math.ceil(corrupt * n - 1e-9), math.ceil(dropout * n - 1e-9)


@lru_cache(maxsize=256)
def neighbourhood(sampled: int, corrupt: float, dropout: float) -> Neighbourhood:
    """The smallest SecAgg+ graph that the analysis above admits for ``sampled`` clients, at most
    a fraction ``corrupt`` of them colluding with the server and ``dropout`` dropping out."""
    if sampled < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients, got {sampled}")
    if not (0 <= corrupt < 1 and 0 <= dropout < 1 and corrupt + dropout < 1):
        raise ValueError(f"need 0 <= corrupt, dropout and corrupt + dropout < 1, got {corrupt}, {dropout}")
    n = sampled
    bad, gone = _counts(n, corrupt, dropout)
    for degree in range(2, n - 1, 2):
        if _disconnects(n, bad + gone, degree):
            continue
        secure, correct = _thresholds(n, bad, gone, degree)
        if secure <= correct:
            return Neighbourhood(n, degree, correct, complete=False)
    return Neighbourhood(n, n - 1, _pick(*_thresholds(n, bad, gone, n - 1)), complete=True)


def _pick(secure: int, correct: int) -> int:
    """The threshold: the largest the dropouts allow (the most colluders tolerated), never below
    the smallest secure one (a round that may halt rather than one that may reveal)."""
    return max(secure, correct)


def flower_share_count(num_shares: int | float, sampled: int) -> int:
    """How many shares Flower's ``SecAggPlusWorkflow.setup_stage`` makes of ``num_shares`` for
    ``sampled`` clients: a fraction becomes ``round(fraction · n)``, bumped to the next odd
    number below n (the client plus k/2 neighbours each side), and the whole federation when
    that leaves two or fewer; an integer is taken as it is (1 meaning every client)."""
    if isinstance(num_shares, float):
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        return sampled if shares <= 2 else shares
    return sampled if num_shares == 1 else int(num_shares)


def threshold_for(sampled: int, num_shares: int, corrupt: float, dropout: float) -> int:
    """The threshold of ``num_shares`` shares (a client and ``num_shares - 1`` neighbours) under the
    analysis above: the largest the dropouts allow, never below the smallest secure one."""
    bad, gone = _counts(sampled, corrupt, dropout)
    return min(_pick(*_thresholds(sampled, bad, gone, min(num_shares, sampled) - 1)), num_shares)


def shares_and_threshold(settings: Mapping, sampled: int) -> tuple[int, int | float]:
    """(shares of each client's secrets, threshold) for a round of ``sampled`` clients.

    ``num_shares: auto`` (the default) takes SecAgg+'s sparse graph of
    :func:`neighbourhood`, under the assumptions
    ``secaggplus.corrupt_fraction`` (colluding with the server) and
    ``secaggplus.dropout_fraction``; an integer or a fraction of the sampled clients is
    Flower's own setting. ``reconstruction_threshold: auto`` is the neighbourhood's
    threshold, or with an explicit ``num_shares`` the smallest secure one for it; an
    integer or a fraction of the shares is Flower's own (the fraction is left to Flower).
    """
    shares_setting, threshold_setting = settings["num_shares"], settings["reconstruction_threshold"]
    if shares_setting == "auto":
        graph = neighbourhood(sampled, float(settings["corrupt_fraction"]), float(settings["dropout_fraction"]))
        shares, threshold = graph.num_shares, graph.threshold
    else:
        shares = min(flower_share_count(shares_setting, sampled), sampled)
        threshold = None
    if threshold_setting == "auto":
        if threshold is None:
            threshold = threshold_for(
                sampled, shares, float(settings["corrupt_fraction"]), float(settings["dropout_fraction"])
            )
    else:
        threshold = threshold_setting
    if isinstance(threshold, int) and threshold > shares:
        raise ConfigError(
            "secaggplus.reconstruction_threshold",
            f"{threshold} is more than the {shares} shares of a round of {sampled} clients (secaggplus.num_shares)",
        )
    return shares, threshold
