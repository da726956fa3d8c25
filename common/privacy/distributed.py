"""A run's distributed noise (``privacy.sample.noise=distributed``), typed and validated once.

Both halves read this one object: the client (its share, its sensitivity, its budget checks)
and the server (when a sum may be released, how it is read back). Everything here follows
from the run config and the head's shape alone, so every client computes the same noise:
the variance of the sum must not depend on which clients happen to hold prior spend.

What distributed noise covers: the recipe's prototype release and its head stage (one noisy
full-federation DP-SGD step per round over stored features). Encoder stages and client-level
DP are refused (``validate``): an encoder round of one step each would need T secure rounds of
full encoder passes, and its millions of coordinates would need a far larger modulus than
Flower's SecAgg+ can map exactly (2**30) for the rounding to cost little.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import ConfigError
from common.privacy.discrete import MODULUS, Sensitivity, SkellamEntry, calibrate_sigma, entry_for
from common.recipe import stage_rounds

#: The extra coordinate of a head step's vector: the count of sampled examples, in count units.
COUNT_KEY = "fedpriv.count"
STAGES = ("prototypes", "head")


def distributed(cfg: Mapping) -> bool:
    """Whether this run's sample-level noise is distributed (a share per client, one noise on the sum)."""
    privacy = cfg["privacy"]
    return privacy["mode"] in ("sample", "both") and privacy["sample"]["noise"] == "distributed"


def clients_asked(cfg: Mapping) -> int:
    """The clients asked per round, as the server's loop computes it from the config."""
    return max(1, round(float(cfg["strategy"]["fraction_train"]) * int(cfg["num_clients"])))


@dataclass(frozen=True)
class DistributedNoise:
    n_min: int  # the fewest contributors whose shares make up the sum's planned noise
    granularity: int  # integer units of one example's clipped norm
    sample_rate: float  # q of a head step
    count_units: int  # integer units of one sampled example in the count
    max_grad_norm: float  # C of the head's per-example gradients
    epsilon: float
    delta: float
    prototype_share: float | None  # the release's share of ε, when the recipe has the prototype round
    head_rounds: int
    head_lr: float  # recipe.head_lr: the server's step on the noised mean gradient, one a round

    @classmethod
    def of(cls, cfg: Mapping) -> "DistributedNoise":
        sample = cfg["privacy"]["sample"]
        dist = sample["distributed"]
        asked = clients_asked(cfg)
        raw = dist["n_min"]
        n_min = math.ceil(float(raw) * asked) if float(raw) <= 1 and not _is_int(raw) else int(raw)
        rounds = stage_rounds(cfg)
        return cls(
            n_min=max(1, n_min),
            granularity=int(dist["granularity"]),
            sample_rate=float(dist["sample_rate"]),
            count_units=int(dist["count_units"]),
            max_grad_norm=float(sample["max_grad_norm"]),
            epsilon=float(sample["epsilon"]),
            delta=float(sample["delta"]),
            prototype_share=float(dist["prototype_share"]) if rounds["prototypes"] else None,
            head_lr=float(cfg["recipe"]["head_lr"]),
            head_rounds=int(rounds["head"]),
        )

    # --- the mechanism of each stage -------------------------------------------------

    def sensitivity(self, stage: str, head_shape: tuple[int, int]) -> Sensitivity:
        """One example's sensitivity in ``stage``: its unit feature in one class row of the
        prototype sums (``hidden`` coordinates), or its clipped head gradient (every weight and
        bias) plus its count."""
        classes, hidden = (int(x) for x in head_shape)
        if stage == "prototypes":
            return Sensitivity.of(self.granularity, hidden)
        return Sensitivity.of(self.granularity, classes * hidden + classes, self.count_units)

    def q(self, stage: str) -> float:
        return 1.0 if stage == "prototypes" else self.sample_rate

    def sigmas(self, head_shape: tuple[int, int]) -> tuple[float | None, float | None]:
        """(σ of the prototype release, σ of the head steps), Gaussian-equivalent, so that the
        planned run spends exactly ``privacy.sample.epsilon`` (the prototype share first)."""
        proto_sens, head_sens = self.sensitivity("prototypes", head_shape), self.sensitivity("head", head_shape)
        prior: list[SkellamEntry] = []
        sigma_p = None
        if self.prototype_share is not None:
            share = self.prototype_share if self.head_rounds > 0 else 1.0
            sigma_p = calibrate_sigma(
                target_epsilon=share * self.epsilon,
                delta=self.delta,
                q=1.0,
                steps=1,
                sensitivity=proto_sens,
                n_min=self.n_min,
            )
            prior = [entry_for(sigma_p, q=1.0, steps=1, sensitivity=proto_sens, n_min=self.n_min)]
        sigma_h = None
        if self.head_rounds > 0:
            sigma_h = calibrate_sigma(
                target_epsilon=self.epsilon,
                delta=self.delta,
                q=self.sample_rate,
                steps=self.head_rounds,
                sensitivity=head_sens,
                n_min=self.n_min,
                prior_discrete=prior,
            )
        return sigma_p, sigma_h

    def entry(self, stage: str, head_shape: tuple[int, int], sigma: float) -> SkellamEntry:
        """The ledger entry of one release of ``stage`` at ``sigma``."""
        return entry_for(
            sigma, q=self.q(stage), steps=1, sensitivity=self.sensitivity(stage, head_shape), n_min=self.n_min
        )

    def units_per_value(self, stage: str) -> float:
        """Integer units per real unit: the prototype release's features have norm 1, the head's
        gradients are clipped to C."""
        return float(self.granularity) if stage == "prototypes" else self.granularity / self.max_grad_norm

    def wrap_margin(self) -> int:
        """A coordinate of a recovered sum beyond this is refused (it may have wrapped the modulus)."""
        return int(0.45 * MODULUS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_distributed(cfg: Mapping) -> None:
    """What distributed noise can be combined with, and n_min against the clients asked
    (``common.config.validate.validate`` checks the numbers' ranges first)."""
    privacy = cfg["privacy"]
    if privacy["mode"] == "client" and privacy["sample"]["noise"] == "distributed":
        raise ConfigError(
            "privacy.sample.noise",
            "distributed noise covers sample-level DP (privacy=sample); client-level DP with distributed "
            "noise is not built yet (privacy=client adds the noise on the server)",
        )
    if not distributed(cfg):
        return
    if not cfg["secagg"]:
        raise ConfigError(
            "privacy.sample.noise",
            "distributed needs secagg=true: each client adds only a share of the noise, which protects "
            "its update only inside the SecAgg+ sum",
        )
    if cfg["privacy"]["mode"] == "both":
        raise ConfigError(
            "privacy.sample.noise",
            "distributed noise covers sample-level DP (privacy=sample); client-level DP with distributed "
            "noise is not built yet (use noise=local with privacy=both)",
        )
    if cfg["privacy"]["sample"]["accountant"] != "rdp":
        raise ConfigError("privacy.sample.accountant", "distributed noise is accounted with RDP: use rdp")
    if cfg["task"] != "sequence_classification":
        raise ConfigError("privacy.sample.noise", "distributed noise covers sequence classification's head")
    rounds = stage_rounds(cfg)
    if rounds["encoder"]:
        raise ConfigError(
            "recipe.encoder_rounds",
            f"{rounds['encoder']} encoder round(s) with noise=distributed: distributed noise covers the "
            "prototype release and head rounds only (one secure round per noisy step; an encoder's "
            "coordinates do not fit SecAgg+'s exact modulus at a useful rounding); use recipe=probe or head "
            "with recipe.encoder_rounds=0",
        )
    raw = cfg["privacy"]["sample"]["distributed"]["n_min"]
    if not _is_int(raw) and raw > 1:
        raise ConfigError("privacy.sample.distributed.n_min", f"a fraction must be in (0, 1], got {raw!r}")
    asked = clients_asked(cfg)
    if _is_int(raw) and raw > asked:
        raise ConfigError("privacy.sample.distributed.n_min", f"{raw} is more than the {asked} clients asked per round")
