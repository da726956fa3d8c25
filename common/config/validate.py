"""Configuration checks that run before any training.

Every bad value stops the run with one :class:`ConfigError` naming the setting.
Two stages: :func:`validate` needs only the config; :func:`validate_partitions`
needs the clients' example counts, because DP's δ must be below 1/n for the
smallest client (sample level) or the number of clients (client level).
:func:`validate` first checks the config's shape against ``common.config.schema`` (known
keys, none missing, types, allowed values), then the ranges and relations here; the
defaults are conf/*.yaml's alone, so every key is read as it stands.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

from common.config import schema
from common.data.sources import TAGGED_SOURCES
from common.errors import ConfigError
from common.privacy.accounting import client_noise
from common.privacy.distributed import distributed, validate_distributed
from common.recipe import validate_recipe
from common.secagg_graph import shares_and_threshold


def _number(
    cfg: Mapping,
    dotted: str,
    *,
    minimum: float | None = None,
    exclusive: bool = True,
    maximum: float | None = None,
    integer: bool = False,
):
    node: object = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(dotted, "is missing")
        node = node[part]
    if node == "???" or node is None:
        raise ConfigError(dotted, "must be set")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(dotted, f"must be a number, got {node!r}")
    if integer and int(node) != node:
        raise ConfigError(dotted, f"must be an integer, got {node!r}")
    if not math.isfinite(node):
        raise ConfigError(dotted, f"must be finite, got {node!r}")
    if minimum is not None and (node <= minimum if exclusive else node < minimum):
        raise ConfigError(dotted, f"must be {'>' if exclusive else '>='} {minimum}, got {node!r}")
    if maximum is not None and node > maximum:
        raise ConfigError(dotted, f"must be <= {maximum}, got {node!r}")
    return node


def _validate_task(cfg: Mapping) -> None:
    """The task and the data must agree; token tagging's own settings."""
    tokens = cfg["task"] == "token_classification"
    tagged = cfg["data"]["source"] in TAGGED_SOURCES
    if tokens and not tagged:
        raise ConfigError("data", "task=token_classification reads tagged words: use data=conll or data=hf_tokens")
    if tagged and not tokens:
        raise ConfigError("task", f"data={cfg['data']['source']} holds tagged words: add task=token_classification")
    if not tokens:
        return
    _number(cfg, "train.outside_weight", minimum=0, maximum=1)
    if cfg["recipe"]["prototypes"]:
        raise ConfigError(
            "recipe.prototypes",
            "class prototypes sum sentence features; token classification has none: set recipe.prototypes=false",
        )
    if cfg["train"]["grad_sample_mode"] == "ghost":
        # Opacus' ghost criterion takes one loss per example from the loss function; the
        # per-sentence sum over tokens is computed in client.training.dp_train, outside it.
        raise ConfigError("train.grad_sample_mode", "ghost clipping is for sequence classification; use hooks")


def validate(cfg: Mapping) -> None:
    """Checks that need the config alone."""
    schema.check(cfg)
    _number(cfg, "num_clients", minimum=1, exclusive=False, integer=True)
    _number(cfg, "rounds", minimum=1, exclusive=False, integer=True)
    _number(cfg, "train.local_epochs", minimum=1, exclusive=False, integer=True)
    if cfg["train"]["batch_size"] is not None:
        _number(cfg, "train.batch_size", minimum=1, exclusive=False, integer=True)
    elif cfg["train"]["sample_rate"] is not None:
        _number(cfg, "train.sample_rate", minimum=0, maximum=1)
    _number(cfg, "train.lr", minimum=0)
    _number(cfg, "train.weight_decay", minimum=0, exclusive=False)
    _number(cfg, "train.max_length", minimum=2, exclusive=False, integer=True)
    _number(cfg, "strategy.fraction_train", minimum=0, maximum=1)
    _number(cfg, "strategy.min_train_clients", minimum=1, exclusive=False, integer=True)
    _number(cfg, "strategy.server_lr", minimum=0)
    _number(cfg, "round_timeout_s", minimum=0)
    mpb = cfg["train"]["max_physical_batch_size"]
    if mpb is not None and (isinstance(mpb, bool) or not isinstance(mpb, int) or mpb < 1):
        raise ConfigError("train.max_physical_batch_size", f"must be null or an integer >= 1, got {mpb!r}")
    if mpb is not None and cfg["train"]["grad_sample_mode"] == "ghost":
        # Opacus' BatchMemoryManager accumulates per-example gradients, which ghost
        # clipping never builds (client.training.dp_train refuses the pair too, for node-config caps).
        raise ConfigError("train.max_physical_batch_size", "cannot be combined with train.grad_sample_mode=ghost")
    _number(cfg, "node_wait_s", minimum=0)
    if cfg["simulation"]["in_flight_per_worker"] is not None:
        _number(cfg, "simulation.in_flight_per_worker", minimum=1, exclusive=False, integer=True)
    if cfg["strategy"]["max_update_norm"] is not None:
        _number(cfg, "strategy.max_update_norm", minimum=0)
    _validate_strategy(cfg)
    validate_recipe(cfg)
    _validate_task(cfg)
    _validate_personal(cfg)

    mode = cfg["privacy"]["mode"]
    if mode in ("sample", "both"):
        _validate_sample(cfg)
    if mode in ("client", "both"):
        _validate_client(cfg)
    if cfg["secagg"]:
        _validate_secagg(cfg)
    if distributed(cfg):
        _validate_distributed(cfg)
    validate_distributed(cfg)


def _validate_distributed(cfg: Mapping) -> None:
    """The ranges of ``privacy.sample.distributed.*`` (their combinations: ``validate_distributed``)."""
    _number(cfg, "privacy.sample.distributed.n_min", minimum=0)
    granularity = _number(
        cfg, "privacy.sample.distributed.granularity", minimum=16, exclusive=False, maximum=2**16, integer=True
    )
    _number(cfg, "privacy.sample.distributed.sample_rate", minimum=0, maximum=1)
    if _number(cfg, "privacy.sample.distributed.prototype_share", minimum=0, maximum=1) == 1:
        raise ConfigError("privacy.sample.distributed.prototype_share", "must be < 1 (the rest is the head steps')")
    _number(
        cfg, "privacy.sample.distributed.count_units", minimum=1, exclusive=False, maximum=granularity, integer=True
    )


def personal_on(cfg: Mapping) -> bool:
    """Whether the run asks the devices to evaluate on their own held-out part or to keep a
    personal model (``data.client_test_fraction`` > 0 or ``personalize`` other than none)."""
    return float(cfg["data"].get("client_test_fraction") or 0) > 0 or cfg["personalize"]["name"] != "none"


def _validate_personal(cfg: Mapping) -> None:
    """``data.client_test_fraction``, ``evaluation.client_every``, ``personalize.*`` and ``data=preferences``."""
    fraction = _number(cfg, "data.client_test_fraction", minimum=0, exclusive=False)
    if fraction >= 1:
        raise ConfigError(
            "data.client_test_fraction", f"must be below 1 (a client must keep data to train on), got {fraction}"
        )
    _number(cfg, "evaluation.client_every", minimum=0, exclusive=False, integer=True)
    if cfg["data"]["source"] == "preferences" and cfg["partition"]["name"] != "iid":
        raise ConfigError(
            "partition", "data=preferences gives each client one simulated user's items: leave partition=iid"
        )
    personal = cfg["personalize"]
    if personal["name"] != "none":
        _number(cfg, "personalize.epochs", minimum=1, exclusive=False, integer=True)
        _number(cfg, "personalize.lr", minimum=0)
        _number(cfg, "personalize.batch_size", minimum=1, exclusive=False, integer=True)
        _number(cfg, "personalize.weight_decay", minimum=0, exclusive=False)
        if _number(cfg, "personalize.momentum", minimum=0, exclusive=False) >= 1:
            raise ConfigError("personalize.momentum", f"must be < 1, got {personal['momentum']!r}")
    if personal["name"] == "mixture":
        _number(cfg, "personalize.alpha", minimum=0, exclusive=False, maximum=1)
        _number(cfg, "personalize.alpha_lr", minimum=0, exclusive=False)
    if not personal_on(cfg):
        return
    setting = "personalize" if personal["name"] != "none" else "data.client_test_fraction"
    if cfg["task"] != "sequence_classification":
        raise ConfigError(setting, "per-client evaluation and personal models are for task=sequence_classification")
    if cfg["model"]["pooling"] == "pooler":
        raise ConfigError(
            setting, "per-client evaluation and personal models read pooled features: set model.pooling=auto|mean|cls"
        )


def _decay(cfg: Mapping, dotted: str) -> None:
    """A decay factor in [0, 1): 1 would never forget (FedAdam's bias correction divides by 0)."""
    if _number(cfg, dotted, minimum=0, exclusive=False) >= 1:
        raise ConfigError(dotted, f"must be < 1, got {_number(cfg, dotted)!r}")


def _validate_strategy(cfg: Mapping) -> None:
    """``strategy.name`` picks the server optimizer (server.round.optimizer; the schema knows the
    names and each one's keys); the ranges of its hyperparameters."""
    name = cfg["strategy"]["name"]
    if name == "fedavgm":
        _decay(cfg, "strategy.server_momentum")
    if name == "fedadam":
        _decay(cfg, "strategy.beta_1")
        _decay(cfg, "strategy.beta_2")
        _number(cfg, "strategy.tau", minimum=0)


def _validate_client(cfg: Mapping) -> None:
    client = cfg["privacy"]["client"]
    _number(cfg, "privacy.client.clipping_norm", minimum=0)
    _number(cfg, "privacy.client.epsilon", minimum=0)
    _number(cfg, "privacy.client.delta", minimum=0)
    if client["delta"] >= 1:
        raise ConfigError("privacy.client.delta", "must be < 1")
    if client["noise_multiplier"] is not None:
        # σ = 0 would release every client's clipped update with no guarantee at all.
        _number(cfg, "privacy.client.noise_multiplier", minimum=0)
    if client["clipping"] == "adaptive":
        _number(cfg, "privacy.client.target_quantile", minimum=0, exclusive=False, maximum=1)
        _number(cfg, "privacy.client.clip_lr", minimum=0)
        if client["clipped_count_stddev"] is not None:
            _number(cfg, "privacy.client.clipped_count_stddev", minimum=0)
    client_noise(client, rounds=int(cfg["rounds"]), num_clients=int(cfg["num_clients"]))  # names σ's bad partner


def _validate_secagg(cfg: Mapping) -> None:
    n = int(cfg["num_clients"])
    sampled = max(1, round(float(cfg["strategy"]["fraction_train"]) * n))
    if sampled < 2:
        raise ConfigError(
            "strategy.fraction_train",
            f"secure aggregation needs at least 2 clients per round, {sampled} would be asked",
        )
    secagg = cfg["secaggplus"]
    corrupt = _number(cfg, "secaggplus.corrupt_fraction", minimum=0, exclusive=False)
    dropout = _number(cfg, "secaggplus.dropout_fraction", minimum=0, exclusive=False)
    if corrupt >= 1:
        raise ConfigError("secaggplus.corrupt_fraction", f"must be < 1, got {corrupt}")
    if corrupt + dropout >= 1:
        raise ConfigError(
            "secaggplus.dropout_fraction",
            f"with secaggplus.corrupt_fraction={corrupt} it must be < {1 - corrupt}, got {dropout}",
        )
    auto_shares = secagg["num_shares"] == "auto"
    shares = None if auto_shares else _number(cfg, "secaggplus.num_shares", minimum=0)
    threshold = (
        None
        if secagg["reconstruction_threshold"] == "auto"
        else _number(cfg, "secaggplus.reconstruction_threshold", minimum=0)
    )
    if isinstance(shares, int) and shares != 1 and not 2 < shares:
        raise ConfigError("secaggplus.num_shares", f"an integer must be > 2 (or a fraction in (0, 1]), got {shares}")
    if isinstance(shares, float) and shares > 1:
        raise ConfigError("secaggplus.num_shares", f"a fraction must be in (0, 1], got {shares}")
    if isinstance(threshold, float) and threshold > 1:
        raise ConfigError("secaggplus.reconstruction_threshold", f"a fraction must be in (0, 1], got {threshold}")
    if isinstance(threshold, int) and isinstance(shares, int) and threshold != 1 and threshold >= shares:
        raise ConfigError(
            "secaggplus.reconstruction_threshold", f"{threshold} must be below secaggplus.num_shares={shares}"
        )
    if isinstance(threshold, int) and threshold > sampled:
        raise ConfigError(
            "secaggplus.reconstruction_threshold", f"{threshold} is more than the {sampled} clients asked per round"
        )
    shares_and_threshold(secagg, sampled)  # an int threshold above the round's shares (num_shares: auto)
    _number(cfg, "secaggplus.clipping_range", minimum=0)
    q_range = _number(cfg, "secaggplus.quantization_range", minimum=0, integer=True)
    mod = _number(cfg, "secaggplus.modulus_range", minimum=0, integer=True)
    if int(mod) & (int(mod) - 1) or mod > 2**32:
        raise ConfigError("secaggplus.modulus_range", f"must be a power of 2 no larger than 2**32, got {mod}")
    if (sampled + 1) * q_range >= mod:
        raise ConfigError(
            "secaggplus.modulus_range",
            f"{mod} overflows: it must exceed (clients per round + 1) * quantization_range = {(sampled + 1) * q_range}",
        )


def _validate_sample(cfg: Mapping) -> None:
    _number(cfg, "privacy.sample.epsilon", minimum=0)
    _number(cfg, "privacy.sample.delta", minimum=0, maximum=1)
    if cfg["privacy"]["sample"]["delta"] >= 1:
        raise ConfigError("privacy.sample.delta", "must be < 1")
    _number(cfg, "privacy.sample.max_grad_norm", minimum=0)
    for client_id, cap in cfg["privacy"]["sample"]["client_budgets"].items():
        setting = f"privacy.sample.client_budgets.{client_id}"
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or not math.isfinite(cap):
            raise ConfigError(setting, f"must be a finite epsilon > 0, got {cap!r}")


def validate_partitions(cfg: Mapping, sizes: Sequence[int]) -> list[str]:
    """Checks that need each client's example count; returns warnings to show."""
    if len(sizes) != cfg["num_clients"]:
        raise ConfigError("num_clients", f"{cfg['num_clients']} clients but {len(sizes)} partitions")
    for client_id, n in enumerate(sizes):
        if n == 0:
            raise ConfigError("partition", f"client {client_id} is left with no training data")
    notes: list[str] = []
    batch = cfg["train"]["batch_size"]
    n_min = min(sizes)
    if batch is not None and batch > n_min:
        raise ConfigError("train.batch_size", f"{batch} is larger than the smallest client's {n_min} examples")
    if cfg["privacy"]["mode"] in ("sample", "both"):
        delta = cfg["privacy"]["sample"]["delta"]
        if delta >= 1 / n_min:
            raise ConfigError(
                "privacy.sample.delta", f"{delta} is not below 1/n = {1 / n_min:.3g} (n = {n_min}, the smallest client)"
            )
        if delta > 1 / (10 * n_min):
            notes.append(
                f"privacy.sample.delta={delta} is above 1/(10 n) = {1 / (10 * n_min):.3g}: "
                "a weak guarantee for the smallest client"
            )
    if cfg["privacy"]["mode"] in ("client", "both"):
        # Client level: n is the number of clients (the unit protected is one client).
        delta, n = cfg["privacy"]["client"]["delta"], int(cfg["num_clients"])
        if delta >= 1 / n:
            raise ConfigError("privacy.client.delta", f"{delta} is not below 1/num_clients = {1 / n:.3g}")
        if delta > 1 / (10 * n):
            notes.append(
                f"privacy.client.delta={delta} is above 1/(10 num_clients) = {1 / (10 * n):.3g}: "
                "a weak client-level guarantee"
            )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes
