"""Client-level DP (DP-FedAvg), both halves of the one mechanism.

Client half (:func:`clip_update`): each client clips its update (local − global
trainable weights) to norm C before it leaves; ``server.round.aggregate`` rejects anything
above C. Server half (:class:`ClientLevelDP`), per released round, in one order
(:meth:`ClientLevelDP.release`): noise the sum at the C the clients clipped to, adapt C
for the next round, account the release (a round not released: :meth:`ClientLevelDP.skip`):

    step = (Σ clipped updates + N(0, (σ_Δ C)²)) / n_planned

which ``server.round.aggregate`` hands to the server optimizer (post-processing).
``n_planned`` is the number of clients asked this round, never the number that replied
(dividing by fewer would shrink the noise relative to one client's C). With adaptive
clipping (Andrew et al. 2021) C then moves towards the ``target_quantile``
of update norms from the noised count of updates that fit under C (0/1 bits,
sensitivity 1), and the accountant uses the combined σ of the two releases
(``common.privacy.accounting.adaptive_noise_split``). The report's ``mechanism`` object
states both noises and the count's sensitivity, so the combined σ, and from it ε,
can be recomputed from the report alone.

All noise here comes from a torch generator seeded from ``os.urandom``, never from the
config's seed (why Flower's DP wrappers are not used: docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common.model.state import state_norm
from common.privacy.accounting import (
    CLIENT_ACCOUNTANT,
    CLIENT_SAMPLE_RATE,
    COUNT_SENSITIVITY,
    ClientNoise,
    client_epsilon,
    client_history,
    client_noise,
)
from common.privacy.randomness import urandom_generator
from common.privacy.units import CLIENT_UNIT
from common.storage import atomic_write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- client half


@dataclass
class ClippedUpdate:
    update: dict[str, torch.Tensor]  # the update scaled to norm <= C (zeros if it was not finite)
    norm: float  # L2 norm of the update before clipping (inf if not finite)
    fits: bool  # norm <= C: the bit adaptive clipping counts (Andrew et al.)


def clip_update(update: Mapping[str, torch.Tensor], clipping_norm: float) -> ClippedUpdate:
    """Scale ``update`` (local − global, all trainable tensors together) to L2 norm <= C.

    Client-level DP's sensitivity is C only if nothing larger ever leaves the client, so
    the two cases Flower's clipping gets wrong are decided here: an update that is not
    finite (NaN passes ``min(1, C / nan)`` unclipped in Flower) is replaced by zeros,
    and a zero update is returned as is (Flower divides by its zero norm). The norm is
    computed in float64 and the clipped norm is measured again after rounding back to the
    parameter dtype (bf16 rounding alone can push it above C).
    """
    if not clipping_norm > 0:
        raise ValueError("clipping_norm must be > 0")
    norm = state_norm(update)
    if not math.isfinite(norm):
        log.warning("client update is not finite: replaced by zeros (the server never sees it)")
        return ClippedUpdate({k: torch.zeros_like(v) for k, v in update.items()}, math.inf, False)
    if norm <= clipping_norm:
        return ClippedUpdate({k: v.clone() for k, v in update.items()}, norm, True)
    scale = clipping_norm / norm * (1 - 1e-6)
    for _ in range(8):
        clipped = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}
        after = state_norm(clipped)
        if after <= clipping_norm:
            return ClippedUpdate(clipped, norm, False)
        # Rounding to a short dtype (bf16 keeps 8 bits) went above C: step further in.
        scale *= clipping_norm / after * (1 - 2**-7)
    return ClippedUpdate({k: torch.zeros_like(v) for k, v in update.items()}, norm, False)


# --------------------------------------------------------------------------- server half


def add_noise(total: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``total`` + N(0, std²) per coordinate, in float64, from ``generator``."""
    out = {}
    for name, value in total.items():
        value = value.to(torch.float64)
        noise = torch.normal(0.0, std, size=value.shape, generator=generator, dtype=torch.float64)
        out[name] = value + noise
    return out


class ClientLevelDP:
    """The server's side of client-level DP for one run; its state is the report block."""

    def __init__(self, cfg: Mapping, generator: torch.Generator | None = None):
        client = cfg["privacy"]["client"]
        self.delta = float(client["delta"])
        self.budget = float(client["epsilon"])
        self.adaptive = client["clipping"] == "adaptive"
        self.clipping_norm = float(client["clipping_norm"])
        self.target_quantile = float(client["target_quantile"])
        self.clip_lr = float(client["clip_lr"])
        self.noise = client_noise(client, rounds=int(cfg["rounds"]), num_clients=int(cfg["num_clients"]))
        self.secagg = bool(cfg["secagg"])
        self.planned_rounds = int(cfg["rounds"])
        self.releases = 0  # aggregates released so far (rounds accounted)
        self.per_round: list[dict] = []
        self.stopped: dict | None = None
        self._gen = generator if generator is not None else urandom_generator()

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    def epsilon_after(self, releases: int) -> float:
        return client_epsilon(self.sigma, releases, self.delta)

    def next_round_exceeds_budget(self, server_round: int) -> bool:
        """True (and the reason recorded) when releasing one more aggregate would pass the budget."""
        eps_next = self.epsilon_after(self.releases + 1)
        if eps_next <= self.budget:
            return False
        self.stopped = {
            "round": server_round,
            "reason": (
                f"client-level ε would reach {eps_next:.4f} after round {server_round}, "
                f"above the budget privacy.client.epsilon={self.budget:g}"
            ),
        }
        return True

    def release(
        self, total: Mapping[str, torch.Tensor], *, fits: float, n_planned: int, server_round: int, clients: int
    ) -> dict[str, torch.Tensor]:
        """One released round, in the mechanism's one order: noise the sum at this round's
        C, adapt C for the next round from the noised count of updates that fit, account.

        Returns the privatised mean step (Σ clipped + noise) / ``n_planned``.
        """
        clipping_norm = self.clipping_norm  # the C this round's clients clipped to (adapt moves it)
        step = self.privatise(total, n_planned)
        self.adapt(fits, n_planned)
        self.record(server_round, released=True, clients=clients, clipping_norm=clipping_norm)
        return step

    def skip(self, server_round: int, *, clients: int) -> None:
        """A round whose aggregate is not released: no noise drawn, no ε spent, C kept."""
        self.record(server_round, released=False, clients=clients, clipping_norm=self.clipping_norm)

    def privatise(self, total: Mapping[str, torch.Tensor], n_planned: int) -> dict[str, torch.Tensor]:
        """(Σ clipped updates + N(0, (σ_Δ C)²)) / n_planned, in float64."""
        if n_planned < 1:
            raise ValueError("n_planned must be >= 1")
        std = self.noise.update_sigma * self.clipping_norm
        return {k: v / n_planned for k, v in add_noise(total, std, self._gen).items()}

    def adapt(self, fits_count: float, n_planned: int) -> None:
        """Geometric update of C from the noised count of updates that fit under C.

        C ← C · exp(−lr · (b̃ − γ)), b̃ = (Σ fits + N(0, σ_b²)) / n_planned: when fewer
        updates fit than the target share γ, C grows; when more fit, it shrinks.
        """
        if not self.adaptive:
            return
        noisy = fits_count + float(torch.normal(0.0, self.noise.count_stddev, size=(1,), generator=self._gen))
        share = noisy / n_planned
        self.clipping_norm *= math.exp(-self.clip_lr * (share - self.target_quantile))

    def record(self, server_round: int, *, released: bool, clients: int, clipping_norm: float) -> None:
        """Account one round: a released aggregate spends ε, a skipped round does not."""
        if released:
            self.releases += 1
        self.per_round.append(
            {
                "round": server_round,
                "epsilon": self.epsilon_after(self.releases),
                "released": released,
                # ε after this many releases: what the report recomputes this round's ε from (a
                # resumed run's count includes a release whose row a crash dropped; restore()).
                "releases": self.releases,
                "clients_contributed": clients,
                "clipping_norm": clipping_norm,
            }
        )

    def block(self) -> dict:
        """The report's ``client_level`` block (DESIGN.md schema, extended)."""
        history = [list(h) for h in client_history(self.sigma, self.releases)]
        return {
            "enabled": True,
            "unit": CLIENT_UNIT,
            "epsilon": self.epsilon_after(self.releases),
            "delta": self.delta,
            "noise_multiplier": self.sigma,
            "clipping_norm": self.clipping_norm,
            "clipping": "adaptive" if self.adaptive else "fixed",
            "budget_epsilon": self.budget,
            "noise_calibrated": self.noise.calibrated,
            "planned_rounds": self.planned_rounds,  # what a calibrated σ was calibrated for
            "update_noise_multiplier": self.noise.update_sigma,
            "clipped_count_stddev": self.noise.count_stddev,
            "mechanism": self.mechanism(),
            "accountant": CLIENT_ACCOUNTANT,
            "history": history,
            "rounds_released": self.releases,
            "stopped": self.stopped,
            "assumptions": self.assumptions(),
            "per_round": list(self.per_round),
        }

    def mechanism(self) -> dict:
        """What was noised and how: σ_eff = (σ_u⁻² + (count_stddev / count_sensitivity)⁻²)^-½."""
        return {
            "update_noise_multiplier": self.noise.update_sigma,
            "count_stddev": self.noise.count_stddev,
            "count_sensitivity": COUNT_SENSITIVITY if self.noise.count_stddev is not None else None,
        }

    def assumptions(self) -> list[str]:
        out = [
            "Neighbouring datasets differ by all data of one client (add/remove one client).",
            f"No amplification by client sampling: a fixed number of clients is asked each round, so every "
            f"released aggregate is accounted at q = {CLIENT_SAMPLE_RATE:g} (RDP, Opacus' accountant; "
            f"history [sigma, q, rounds]).",
            "Equal weights: the noised sum of clipped updates is divided by the number of clients asked "
            "that round, never by the number that replied; example counts never travel.",
            "Each client clips its own update (local minus global trainable weights) to the clipping norm "
            "before it leaves; the server rejects any update above it.",
            "The guarantee covers what leaves the server (the models and the aggregates); "
            + (
                "with secure aggregation the server itself sees only the un-noised sum of clipped updates."
                if self.secagg
                else "the server itself sees each client's clipped update before noise."
            ),
            "A round whose aggregate is not released (too few replies) spends no client-level ε.",
        ]
        if self.noise.calibrated:
            out.append(
                f"σ was calibrated so that all {self.planned_rounds} planned rounds stay within "
                f"privacy.client.epsilon={self.budget:g}."
            )
        if self.adaptive:
            out.append(
                f"Adaptive clipping: the count of updates that fit under C (each client adds a 0/1 bit, "
                f"sensitivity {COUNT_SENSITIVITY:g}) is noised with standard deviation "
                f"{self.noise.count_stddev:g}; the update sum gets σ_Δ = {self.noise.update_sigma:.4g}, so "
                f"that both releases together are one Gaussian mechanism at σ = {self.sigma:.4g}."
            )
        return out

    def write(self, path: Path) -> None:
        """Write the block to ``path`` (the run directory's ``client_level.json``: common.rundir)."""
        atomic_write_json(path, self.block())

    def restore(self, path: Path, completed_rounds: int) -> None:
        """Continue a resumed run: spend, per-round ε and C as of its last completed round.

        The stored noise is kept: a resume may change ``rounds``, which would calibrate
        another σ, while the rounds already released were noised with the stored one (the
        budget stop before each round still holds at that σ). A σ given in the config
        must match the stored one. A
        round recorded after ``completed_rounds`` was cut short by a crash, but its
        noised aggregate may already have been written: its release stays counted
        (conservative — the redone round counts again), only its row is dropped.
        """
        if not path.exists():
            return
        block = json.loads(path.read_text())
        if block.get("noise_multiplier") != self.sigma:
            if not (self.noise.calibrated and block.get("noise_calibrated")):
                raise ValueError(
                    f"{path}: noise multiplier {block.get('noise_multiplier')} != this run's "
                    f"privacy.client.noise_multiplier {self.sigma}"
                )
            self.noise = ClientNoise(
                float(block["noise_multiplier"]),
                True,
                float(block["update_noise_multiplier"]),
                block.get("clipped_count_stddev"),
            )
            self.planned_rounds = int(block.get("planned_rounds", self.planned_rounds))
            log.info("client level: keeping the stored sigma %.6g (calibrated for the original rounds)", self.sigma)
        stored = block.get("per_round") or []
        self.releases = sum(bool(p.get("released", True)) for p in stored)
        self.per_round = [p for p in stored if p["round"] <= completed_rounds]
        if self.per_round and self.per_round[-1]["round"] == stored[-1]["round"]:
            self.clipping_norm = float(block["clipping_norm"])  # C after the last completed round
        elif self.per_round and self.adaptive:
            raise ValueError(f"{path}: adaptive C after round {completed_rounds} was not kept")
