"""One-run privacy auditing: canary guesses → a lower bound on ε.

Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training Run": each of
``m`` canaries is in the training data with probability 1/2; the auditor guesses
"included" for the ``k_plus`` highest-scoring canaries and "excluded" for the ``k_minus``
lowest. Under (ε, δ)-DP the number of right guesses among ``r`` is dominated by
Binomial(r, e^ε / (1 + e^ε)), plus 2·m·δ (a conservative stand-in for the paper's δ
term), so the lower bound is the largest ε that ``v`` right guesses reject at confidence
1-β (the argument: docs/privacy.md).

Caveat: the audit can confirm the accounting only when the bound it could show with every
guess right (:func:`max_detectable_epsilon`) reaches the accounted ε; below that
:func:`verdict` says ``inconclusive``. At the default ε = 8, δ = 1e-5 every audit is
inconclusive unless it finds ε exceeded (docs/privacy.md has the numbers).
Nothing here depends on how the model was trained; see client/canary_audit.py for the run.
``joint_scores`` (below) is the white-box score client/canary_audit.py uses: any function of
the released output and of data fixed before the bits were drawn keeps the bound valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import binom


def p_correct(eps: float) -> float:
    """Largest probability that one membership guess is right under ε-DP."""
    return 1.0 / (1.0 + math.exp(-eps))


def tail(r: int, v: int, eps: float) -> float:
    """P[Binomial(r, p(ε)) ≥ v]."""
    if v <= 0:
        return 1.0
    return float(binom.sf(v - 1, r, p_correct(eps)))


def epsilon_lower_bound(
    r: int,
    v: int,
    *,
    m: int | None = None,
    delta: float = 0.0,
    confidence: float = 0.95,
    eps_max: float = 100.0,
    tol: float = 1e-6,
) -> float:
    """Largest ε that ``v`` correct of ``r`` guesses reject at ``confidence`` (0 if none).

    ``m`` is the number of canaries (for the δ term; defaults to ``r``).
    """
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= correct <= guesses, got {v} of {r}")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    beta = 1.0 - confidence
    slack = beta - 2.0 * (r if m is None else m) * delta
    if r == 0 or slack <= 0:
        return 0.0

    def rejected(eps: float) -> bool:
        return tail(r, v, eps) <= slack

    if not rejected(0.0):
        return 0.0
    if rejected(eps_max):
        return eps_max
    lo, hi = 0.0, eps_max  # rejected(lo) and not rejected(hi)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def max_detectable_epsilon(r: int, *, m: int | None = None, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The audit's power: the bound ``r`` guesses would give were every one of them right."""
    return epsilon_lower_bound(r, r, m=m, delta=delta, confidence=confidence)


#: The three verdicts, as audit.json writes them.
CONSISTENT, EXCEEDS, INCONCLUSIVE = "consistent", "exceeds", "inconclusive"


def verdict(bound: float, max_detectable: float, accounted: float) -> str:
    """What an audit may say about an accounted ε.

    ``exceeds``: the lower bound is above the accounted ε (the accounting or the
    implementation is wrong, at the audit's confidence). ``inconclusive``: it is not, but
    even all guesses right could not have shown the accounted ε (``max_detectable`` below
    it, and always for an infinite accounted ε, σ = 0), so the audit cannot tell a
    correct accounting from a broken one. ``consistent``: the audit could have shown the
    accounted ε and did not exceed it.
    """
    if bound > accounted:
        return EXCEEDS
    if max_detectable < accounted:
        return INCONCLUSIVE
    return CONSISTENT


@dataclass(frozen=True)
class AuditResult:
    canaries: int  # m
    guesses: int  # r
    correct: int  # v
    epsilon_lower_bound: float
    confidence: float
    delta: float
    max_detectable_epsilon: float = math.nan  # the bound were all r guesses right


def guesses(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): guess 'in' for the k_plus top scores, 'out' for the k_minus bottom ones."""
    if k_plus + k_minus > len(scores):
        raise ValueError("more guesses than canaries")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    outs = order[:k_minus]
    ins = order[len(order) - k_plus :] if k_plus else []
    correct = sum(bool(included[i]) for i in ins) + sum(not included[i] for i in outs)
    return k_plus + k_minus, correct


def audit(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
) -> AuditResult:
    """Score → guesses → lower bound, with the number of guesses fixed before looking.

    ``k_plus``/``k_minus`` must be chosen before the scores are seen (picking the best
    of many would need a multiple-testing correction).
    """
    if len(scores) != len(included):
        raise ValueError("one score per canary")
    r, v = guesses(scores, included, k_plus, k_minus)
    bound = epsilon_lower_bound(r, v, m=len(scores), delta=delta, confidence=confidence)
    power = max_detectable_epsilon(r, m=len(scores), delta=delta, confidence=confidence)
    return AuditResult(len(scores), r, v, bound, confidence, delta, power)


# --------------------------------------------------------------------------- scores
# A white-box score says how much of a released model update is canary i's own
# descent direction. It is the auditor's post-processing: it sees the canaries, the
# data fixed before the inclusion bits were drawn, and the released weights, never
# the bits (nor which examples a step sampled).


def joint_scores(directions: torch.Tensor, update: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """[k]: coefficients of ``update`` [D] on the unit ``directions`` [k, D], fitted jointly.

    One step of DP-SGD moves the weights by a sum of clipped per-example gradients (and
    noise); while the gradients change little, a released update is ≈ Σ_j c_j d_j over
    the examples j that were sampled, c_j ≥ 0, and 0 for an excluded canary. Projecting
    the update on d_i alone also picks up every other example whose direction is
    correlated with d_i (canaries of one label share the head's push towards it;
    random-token canaries share "junk input" directions); least squares on all
    directions at once removes that. Ridge ``ridge × mean(diag Gram)`` keeps it
    defined when directions are nearly collinear.
    """
    if directions.ndim != 2 or update.shape != directions.shape[1:]:
        raise ValueError("directions [k, D] and update [D]")
    g = directions.double()
    gram = g @ g.T
    lam = ridge * float(gram.diagonal().mean())
    eye = torch.eye(len(g), dtype=g.dtype)
    return torch.linalg.solve(gram + lam * eye, g @ update.double()).to(update.dtype)
