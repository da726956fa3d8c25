"""Configuration checks that run before any training.

Every bad value stops the run with one :class:`ConfigError` naming the setting.
Two stages: :func:`validate` needs only the config; :func:`validate_partitions`
needs the clients' example counts, because DP's δ must be below 1/n for the
smallest client (sample level) or the number of clients (client level).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

from common.accounting import ACCOUNTANTS
from common.errors import ConfigError

PRIVACY_MODES = ("none", "sample")


def _number(cfg: Mapping, dotted: str, *, minimum: float | None = None, exclusive: bool = True,
            maximum: float | None = None, integer: bool = False):
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


def validate(cfg: Mapping) -> None:
    """Checks that need the config alone."""
    _number(cfg, "num_clients", minimum=1, exclusive=False, integer=True)
    _number(cfg, "rounds", minimum=1, exclusive=False, integer=True)
    _number(cfg, "train.local_epochs", minimum=1, exclusive=False, integer=True)
    _number(cfg, "train.batch_size", minimum=1, exclusive=False, integer=True)
    _number(cfg, "train.lr", minimum=0)
    _number(cfg, "train.weight_decay", minimum=0, exclusive=False)
    _number(cfg, "train.max_length", minimum=2, exclusive=False, integer=True)
    _number(cfg, "strategy.fraction_train", minimum=0, maximum=1)
    _number(cfg, "strategy.min_train_clients", minimum=1, exclusive=False, integer=True)
    _number(cfg, "strategy.server_lr", minimum=0)
    _number(cfg, "round_timeout_s", minimum=0)
    if cfg["train"].get("optimizer", "adamw") not in ("adamw", "sgd"):
        raise ConfigError("train.optimizer", f"must be adamw or sgd, got {cfg['train']['optimizer']!r}")
    if cfg["train"].get("grad_sample_mode", "hooks") not in ("hooks", "ghost"):
        raise ConfigError("train.grad_sample_mode",
                          f"must be hooks or ghost, got {cfg['train']['grad_sample_mode']!r}")
    if cfg["train"].get("device", "cpu") not in ("cpu", "cuda", "auto"):
        raise ConfigError("train.device", f"must be cpu, cuda or auto, got {cfg['train']['device']!r}")
    if cfg.get("secagg"):
        raise ConfigError("secagg", "secure aggregation is not available in this version; set secagg=false")
    _number(cfg, "node_wait_s", minimum=0)
    if cfg["strategy"].get("max_update_norm") is not None:
        _number(cfg, "strategy.max_update_norm", minimum=0)

    mode = cfg["privacy"].get("mode")
    if mode not in PRIVACY_MODES:
        raise ConfigError("privacy", f"unknown privacy mode {mode!r}; choose one of {list(PRIVACY_MODES)}")
    if mode in ("sample", "both"):
        _validate_sample(cfg)


def _validate_sample(cfg: Mapping) -> None:
    _number(cfg, "privacy.sample.epsilon", minimum=0)
    _number(cfg, "privacy.sample.delta", minimum=0, maximum=1)
    if cfg["privacy"]["sample"]["delta"] >= 1:
        raise ConfigError("privacy.sample.delta", "must be < 1")
    _number(cfg, "privacy.sample.max_grad_norm", minimum=0)
    accountant = cfg["privacy"]["sample"].get("accountant")
    if accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.sample.accountant",
                          f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    budgets = cfg["privacy"]["sample"].get("client_budgets") or {}
    if not isinstance(budgets, Mapping):
        raise ConfigError("privacy.sample.client_budgets", "must be a map client_id -> epsilon")
    for client_id, cap in budgets.items():
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
    if batch > n_min:
        raise ConfigError("train.batch_size",
                          f"{batch} is larger than the smallest client's {n_min} examples")
    if cfg["privacy"]["mode"] in ("sample", "both"):
        delta = cfg["privacy"]["sample"]["delta"]
        if delta >= 1 / n_min:
            raise ConfigError("privacy.sample.delta",
                              f"{delta} is not below 1/n = {1 / n_min:.3g} (n = {n_min}, the smallest client)")
        if delta > 1 / (10 * n_min):
            notes.append(f"privacy.sample.delta={delta} is above 1/(10 n) = {1 / (10 * n_min):.3g}: "
                         "a weak guarantee for the smallest client")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes
