"""The client's half of distributed noise: integer contributions plus a share of Skellam noise.

Every release here is a vector of integers that the client hands to SecAgg+ as it is; the server
learns only the exact integer sum over clients (``server.round.secagg``). The analysis and the
run's parameters are ``common.privacy.discrete`` and ``common.privacy.distributed``.

Privacy caveats, stated plainly:
- Each example's contribution is scaled to at most ``granularity`` integer units and rounded
  on its own, by conditional randomised rounding: a rounding whose norm exceeds the bound the
  accountant uses is drawn again, so removing one example removes one vector within the bound.
- The share alone (variance μ / n_min per coordinate) protects this client's message only as
  ``epsilon_local`` states; the ε against the server needs the other shares in the sum.
- Nothing is applied to the vector after its share is added: no clipping, no rounding, no
  modulus (SecAgg+'s modular sum is a function of the exact sum).
- Noise and sampling draw from generators seeded from ``os.urandom`` (no CSPRNG).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from client.training.dp_train import finite_rows
from common.privacy.discrete import SkellamEntry, rounded_norm_bound
from common.privacy.distributed import COUNT_KEY, DistributedNoise
from common.privacy.randomness import urandom_generator
from common.recipe import HEAD_PREFIX

#: Examples whose per-example head gradients are built at a time (memory: chunk × classes × hidden).
CHUNK = 256


def noise_generator() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the OS (never the config's seed)."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def skellam_share(shape: tuple[int, ...], variance: float, rng: np.random.Generator) -> torch.Tensor:
    """Skellam noise of ``variance`` per coordinate: Poisson(variance/2) − Poisson(variance/2)."""
    lam = float(variance) / 2
    return torch.from_numpy(
        rng.poisson(lam, size=shape).astype(np.int64) - rng.poisson(lam, size=shape).astype(np.int64)
    )


def conditional_round(x: torch.Tensor, bound: float, gen: torch.Generator) -> torch.Tensor:
    """Each row of ``x`` rounded to integers without bias (up with the probability of its
    fraction), drawn again until its L2 norm is at most ``bound``."""
    x = x.to(torch.float64)
    low = torch.floor(x)
    frac = x - low
    out = low + (torch.rand(x.shape, generator=gen, dtype=torch.float64) < frac)
    bad = out.norm(dim=1) > bound
    while bool(bad.any()):
        rows = bad.nonzero().flatten()
        redraw = low[rows] + (torch.rand((len(rows), x.shape[1]), generator=gen, dtype=torch.float64) < frac[rows])
        out[rows] = redraw
        bad = out.norm(dim=1) > bound
    return out.to(torch.int64)


def prototype_release(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, noise: DistributedNoise, entry: SkellamEntry
) -> torch.Tensor:
    """Per-class sums of each example's unit feature × granularity, each rounded on its own, plus
    this client's share on every entry of all ``num_labels`` sums (int64 [K, hidden])."""
    unit = F.normalize(finite_rows(features.to(torch.float64)), p=2, dim=1) * noise.granularity
    hidden = unit.shape[1]
    rounded = conditional_round(unit, rounded_norm_bound(noise.granularity, hidden), urandom_generator())
    sums = torch.zeros(int(num_labels), hidden, dtype=torch.int64)
    sums.index_add_(0, labels.to(torch.long), rounded)
    return sums + skellam_share(tuple(sums.shape), entry.share_mu, noise_generator())


def head_step(
    global_state: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    noise: DistributedNoise,
    entry: SkellamEntry,
) -> dict[str, torch.Tensor]:
    """One DP-SGD step's contribution on the linear head: the sum over this client's sampled
    examples (Poisson at ``entry.q``) of each one's clipped, scaled, rounded gradient of the
    cross-entropy at the global head, and their count in count units; each coordinate plus this
    client's share. Keys: the head's weight and bias, and :data:`COUNT_KEY`."""
    weight = global_state[f"{HEAD_PREFIX}weight"].to(torch.float64)
    bias_key = f"{HEAD_PREFIX}bias"
    bias = global_state[bias_key].to(torch.float64) if bias_key in global_state else None
    classes, hidden = weight.shape
    x = finite_rows(features.to(torch.float64))
    y = labels.to(torch.long)
    if entry.q < 1:
        keep = torch.rand(len(x), generator=urandom_generator(), dtype=torch.float64) < entry.q
        x, y = x[keep], y[keep]
    dim = classes * hidden + (classes if bias is not None else 0)
    bound = rounded_norm_bound(noise.granularity, dim)
    scale = noise.units_per_value("head")
    total = torch.zeros(dim, dtype=torch.int64)
    gen = urandom_generator()
    for start in range(0, len(x), CHUNK):
        xb, yb = x[start : start + CHUNK], y[start : start + CHUNK]
        logits = xb @ weight.T + (bias if bias is not None else 0)
        residual = torch.softmax(logits, dim=1) - F.one_hot(yb, classes).to(torch.float64)  # dCE/dlogits
        grads = (residual[:, :, None] * xb[:, None, :]).reshape(len(xb), -1)
        if bias is not None:
            grads = torch.cat([grads, residual], dim=1)
        norms = grads.norm(dim=1, keepdim=True)
        clipped = grads * torch.clamp(noise.max_grad_norm / norms.clamp_min(1e-12), max=1.0)
        total += conditional_round(clipped * scale, bound, gen).sum(dim=0)
    rng = noise_generator()
    total = total + skellam_share((dim,), entry.share_mu, rng)
    count = torch.tensor([noise.count_units * len(x)], dtype=torch.int64) + skellam_share((1,), entry.share_mu, rng)
    out = {f"{HEAD_PREFIX}weight": total[: classes * hidden].reshape(classes, hidden)}
    if bias is not None:
        out[bias_key] = total[classes * hidden :].clone()
    out[COUNT_KEY] = count
    return out
