"""One client round, free of Flower: budget decision → train → ledger → reply.

The order is the privacy contract (DESIGN.md, "Privacy semantics"):
1. Lock the client's state directory, then load the ledger (the only record of
   prior spend, across runs and restarts); the lock is held until step 6.
2. A round already answered is answered again from the kept reply: no new spend.
3. The device's own checks: the ledger's δ and accountant are the run's, and δ is
   below 1/n for this device's n; otherwise decline with a fixed reason.
4. σ is calibrated once per run from the run's budget and the planned steps of
   the whole run, against the prior spend; a resumed run reuses the stored σ.
5. If ε after this round would exceed the client's cap, decline: no training.
6. Train with DP-SGD, then commit the reply and the ledger durably — before the
   caller may release anything.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from client.device import autocast_dtype, select_device
from client.training.dp_train import DPSettings, calibrate_run, local_train, planned_steps_per_round, release_prototypes
from client.privacy.ledger import Ledger, LedgerBusy, RoundEntry, load_reply, locked, reply_key, save_reply
from client.privacy.node_config import ClientIdentity
from client.privacy.policy import REASON_DELTA
from common.privacy.accounting import append_steps, epsilon, prototype_entry, sample_rate, train_batch_size
from common.data.cache import DATA_CACHE, BoundedCache, key_of
from common.data.partition import load_client_data
from common.data.sources import load_local_data
from common.data.tokenizing import tokenize
from common.data.features import (cached_features, data_digests, data_files, feature_key, features_key_parts,
                             frozen_features, stored_features)
from common.errors import ConfigError
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import load_trainable, state_digest, trainable_state
from common.recipe import HEAD_PREFIX, check_model, head_keys, recipe_of, stage_of, stage_rounds

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    declined: bool
    reason: str
    update: dict[str, torch.Tensor] | None  # local − global trainable weights
    privacy: dict[str, Any] = field(default_factory=dict)  # what the report needs
    resent: bool = False  # answered from the kept reply (no new spend)
    # What protected this round's release and what it cost, for the device's own
    # transparency log (client.privacy.transparency): sigma, clip_norm, sample_rate, steps,
    # mechanism, epsilon_before, epsilon_after. Never sent.
    protection: dict[str, Any] | None = None


# Models and tokenised partitions are costly to rebuild; one process serves many rounds (a
# simulation actor serves every client it is given). The tokenised partitions are kept in the
# process's one bounded data cache (common.data.cache.DATA_CACHE), next to the partitions they
# are cut from; the model (one) and the tokenizer (shared by every client: loading it again
# for each new client cost ~35 ms each) are kept here.
_MODEL_CACHE: dict[str, torch.nn.Module] = {}
_TOKENIZER_CACHE = BoundedCache(maxsize=2)

#: Where the last round's time went on this device (seconds), for client.app's profile
#: line: ``data_s`` (its data read and tokenised), ``model_s`` (the model built or copied),
#: ``features_s`` (its frozen features, computed or read back), ``train_s`` (local training
#: or the prototype release), and ``from_stored_features`` (the round read neither data nor
#: encoder: :func:`_cached_inputs`). Times only.
LAST_TIMINGS: dict[str, Any] = {}


_key = key_of  # the one key function (common.data.cache): the caches' keys, and a round's shuffle seed without DP


def _fresh_model(cfg: Mapping, num_labels: int) -> torch.nn.Module:
    """A pristine copy of the configured model (Opacus must never see a reused wrapper)."""
    key = _key(cfg["model"], num_labels, cfg["seed"])
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model per process is enough
        _MODEL_CACHE[key] = instantiate_model(cfg, num_labels)
    return copy.deepcopy(_MODEL_CACHE[key])


def _client_data(cfg: Mapping, partition_id: int, data_path: str | None = None):
    """(this client's tokenised partition, label names), from :data:`DATA_CACHE` while the data
    files hold the bytes it was read from (a file edited, grown or cut since is read again)."""
    tokenizer_name = cfg["model"]["tokenizer"] or cfg["model"]["name_or_path"]

    def read():
        partition, label_names = load_local_data(cfg, data_path) if data_path else load_client_data(cfg, partition_id)
        tokenizer = _TOKENIZER_CACHE.get((tokenizer_name,), lambda: load_tokenizer(cfg["model"]))
        return tokenize(partition, tokenizer, int(cfg["train"]["max_length"]), label_names), label_names

    parts = ("tokenised", cfg["data"], cfg["partition"], cfg["seed"], cfg["num_clients"], tokenizer_name,
             cfg["train"]["max_length"], partition_id, data_path)
    return DATA_CACHE.get(parts, read, data_files(cfg, data_path))


def client_features(cfg: Mapping, who: ClientIdentity, model: torch.nn.Module, data, device) -> Any:
    """This client's features (the frozen encoder's: pooled, or per word for tagged data),
    computed once, kept on the device."""
    check_model(cfg, model)  # a device refuses, naming model.pooling, what the server should have
    # Stored under the digests of the bytes ``data`` was read from, not the files' now: a file
    # changed since the read must not have these features stored as its own.
    digests = DATA_CACHE.read_from(data)
    if digests is None:  # data a caller read itself: the files as they are now
        digests = data_digests(cfg, who.data_path)
    key = _features_key(cfg, who, digests)

    def compute():
        log.info("client %s: computing the frozen features of its %d examples (once)", who.client_id, len(data))
        model.to(device)
        try:
            return frozen_features(model, data)
        finally:
            model.to("cpu")

    return cached_features(Ledger.directory(who.state_dir, who.client_id), key, compute, digests=digests,
                           n=len(data))


def _features_key(cfg: Mapping, who: ClientIdentity, digests: list[str | None]) -> str:
    return feature_key(*features_key_parts(cfg, who.partition_id, who.data_path, digests))


class _Head(torch.nn.Module):
    """The head of a frozen-encoder model alone, for a round that reads cached features."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]):
        super().__init__()
        out_features, in_features = global_state[f"{HEAD_PREFIX}weight"].shape
        self.classifier = torch.nn.Linear(int(in_features), int(out_features),
                                          bias=f"{HEAD_PREFIX}bias" in global_state)


def _cached_inputs(cfg: Mapping, who: ClientIdentity, stage: str, global_state: Mapping[str, torch.Tensor]):
    """(features, number of labels) when this round needs neither the data nor the encoder:
    a prototype or head round, only the head travels, and this client's features are stored.

    A fresh process (a SuperNode's per-message ClientApp) then reads no data, loads no
    tokenizer and builds no encoder (1.5 s of each message on tiny_bert: BENCHMARKS.md).
    The features' key covers the model, the data settings and the bytes of the data files,
    and the file holds the digests and n they were computed from, checked here against the
    files now: so the stored features are those the client would compute now, and n is their count.
    """
    if stage == "encoder" or len(head_keys(global_state)) != len(global_state):
        return None
    digests = data_digests(cfg, who.data_path)
    feats = stored_features(Ledger.directory(who.state_dir, who.client_id), _features_key(cfg, who, digests),
                            digests=digests)
    if feats is None:
        return None
    return feats, int(global_state[f"{HEAD_PREFIX}weight"].shape[0])


def current_epsilon(ledger: Ledger) -> float | None:
    """The ledger's ε so far (None before its first DP spend, when it has no δ pinned)."""
    if not ledger.history or ledger.delta is None:
        return None
    return epsilon(ledger.history, float(ledger.delta), ledger.accountant)


def _after_round(history, stage: str, sigma: float, q: float, steps: int) -> list:
    """The accountant history after one round of ``stage``: the budget check's and the ledger's."""
    if stage == "prototypes":
        return [*map(tuple, history), prototype_entry(sigma)]
    return append_steps(history, sigma, q, steps)


def budget_epsilon(cfg: Mapping, who: ClientIdentity) -> float:
    """The lowest of the run's budget, the config's per-client cap and the device's cap."""
    sample = cfg["privacy"]["sample"]
    caps = [float(sample["epsilon"])]
    per_client = {str(k): v for k, v in sample["client_budgets"].items()}
    if who.client_id in per_client:
        caps.append(float(per_client[who.client_id]))
    if who.max_epsilon is not None:
        caps.append(float(who.max_epsilon))
    return min(caps)


def privacy_summary(cfg: Mapping, who: ClientIdentity, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The client's report entry (clients_reported.json) — recomputable from ``history``."""
    sample = cfg["privacy"]["sample"]
    calib = ledger.runs.get(run_id)
    entries = ledger.run_entries(run_id)
    budget = budget_epsilon(cfg, who)
    return {
        "client_id": who.client_id,
        "accountant": sample["accountant"],
        "delta": float(sample["delta"]),
        "budget_epsilon": budget,
        "noise_multiplier": calib.noise_multiplier if calib else None,
        "max_grad_norm": float(sample["max_grad_norm"]),
        "sample_rate": calib.sample_rate if calib else None,
        "history": [list(h) for h in ledger.history],
        # steps: the history's cumulative step count after that round, so the server can
        # recompute each round's ε from ``history`` instead of trusting ``epsilon``.
        "per_round": [{"round": e.round, "epsilon": e.epsilon, "steps": e.steps}
                      for e in entries if e.status == "trained"],
        "rounds_participated": sum(e.status == "trained" for e in entries),
        "rounds_declined": sum(e.status == "declined" for e in entries),
        "exhausted": bool(entries and entries[-1].status == "declined" and entries[-1].reason == "budget"),
    }


#: Decline reasons: fixed texts (with the setting's name), since they leave the device.
REASON_BUSY = "busy: another round holds this client's ledger"
REASON_DELTA_N = "privacy.sample.delta: not below 1/n for this device's data"


def run_round(
    cfg: Mapping,
    who: ClientIdentity,
    *,
    run_id: str,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
) -> RoundOutcome:
    """Answer the server's training request for ``server_round``, one round per client at a time."""
    LAST_TIMINGS.clear()
    LAST_TIMINGS.update(server_round=server_round, stage=stage_of(cfg, server_round))
    t0 = time.perf_counter()
    cached = _cached_inputs(cfg, who, LAST_TIMINGS["stage"], global_state)
    if cached is None:
        data, label_names = _client_data(cfg, who.partition_id, who.data_path)
        feats, num_labels = None, len(label_names)
    else:
        (feats, num_labels), data = cached, None
    LAST_TIMINGS.update(data_s=time.perf_counter() - t0, from_stored_features=cached is not None)
    try:
        with locked(who.state_dir, who.client_id, timeout=float(cfg["round_timeout_s"])):
            return _locked_round(cfg, who, data, num_labels, run_id=run_id, server_round=server_round,
                                 global_state=global_state, feats=feats)
    except LedgerBusy:
        log.warning("client %s declines round %d: its ledger is held by another round", who.client_id, server_round)
        ledger = Ledger.load(who.state_dir, who.client_id)  # atomic writes: a consistent read
        return RoundOutcome(True, REASON_BUSY, None, privacy_summary(cfg, who, ledger, run_id),
                            protection=_unchanged(ledger))


def _locked_round(cfg: Mapping, who: ClientIdentity, data, num_labels: int, *, run_id: str, server_round: int,
                  global_state: Mapping[str, torch.Tensor], feats=None) -> RoundOutcome:
    """One round under the client's lock: ``data`` (tokenised), or None with ``feats``, its
    stored features (:func:`_cached_inputs`)."""
    train = cfg["train"]
    dp_on = cfg["privacy"]["mode"] in ("sample", "both")
    digest = state_digest(global_state)
    key = reply_key(run_id, server_round, digest)

    ledger = Ledger.load(who.state_dir, who.client_id)
    done = ledger.entry(run_id, server_round)
    if done is not None:
        kept = load_reply(who.state_dir, who.client_id, done.reply_key) if done.status == "trained" else None
        if done.status == "trained" and done.reply_key == key and kept is not None:
            log.info("client %s: round %d already answered; resending the kept reply", who.client_id, server_round)
            return RoundOutcome(False, "", kept, privacy_summary(cfg, who, ledger, run_id), resent=True,
                                protection=_unchanged(ledger))
        if done.status == "declined":
            return RoundOutcome(True, done.reason, None, privacy_summary(cfg, who, ledger, run_id), resent=True,
                                protection=_unchanged(ledger))
        # Trained for this round on other global weights (or the reply was lost):
        # training again would spend twice for one round, so decline instead.
        return RoundOutcome(True, "already-trained", None, privacy_summary(cfg, who, ledger, run_id), resent=True,
                            protection=_unchanged(ledger))

    n = len(data) if data is not None else len(feats)
    stage = stage_of(cfg, server_round)
    recipe, plan = recipe_of(cfg), stage_rounds(cfg)
    batch_size = train_batch_size(train, n, private=dp_on)
    steps = 1 if stage == "prototypes" else planned_steps_per_round(n, batch_size, int(train["local_epochs"]))
    q = sample_rate(n, batch_size)
    previous = copy.deepcopy(ledger)

    def decline(reason: str, eps_now: float | None) -> RoundOutcome:
        ledger.rounds.append(RoundEntry(run_id, server_round, "declined", eps_now, reason=reason))
        ledger.commit(who.state_dir, previous)
        return RoundOutcome(True, reason, None, privacy_summary(cfg, who, ledger, run_id),
                            protection={"epsilon_before": eps_now, "epsilon_after": eps_now, "delta": ledger.delta})

    dp = None
    if dp_on:
        sample = cfg["privacy"]["sample"]
        delta, accountant = float(sample["delta"]), str(sample["accountant"])
        try:
            ledger.check_pins(delta, accountant)
        except ConfigError as err:
            # The server checks simulated clients' ledgers up front (server.round.loop.prepare);
            # a device says only which setting disagrees with its ledger.
            log.warning("client %s declines round %d: %s", who.client_id, server_round, err)
            return decline(f"{err.setting}: differs from this device's ledger",
                           epsilon(ledger.history, float(ledger.delta), ledger.accountant))
        if not delta < 1 / n:
            log.warning("client %s declines round %d: privacy.sample.delta=%g is not below 1/n = 1/%d",
                        who.client_id, server_round, delta, n)
            return decline(REASON_DELTA_N, epsilon(ledger.history, delta, accountant))
        limit = who.policy.delta_limit(n)
        if limit is not None and delta > limit:
            log.warning("client %s declines round %d: privacy.sample.delta=%g is above its cap %g (node-config "
                        "max-delta, default min(1e-5, 1/(10 n)))", who.client_id, server_round, delta, limit)
            return decline(REASON_DELTA, epsilon(ledger.history, delta, accountant))
        if delta > 1 / (10 * n):
            log.warning("client %s: privacy.sample.delta=%g is above 1/(10 n) for its %d examples: "
                        "a weak guarantee", who.client_id, delta, n)
        calib = ledger.runs.get(run_id)
        if calib is None:
            calib = calibrate_run(sample, n=n, batch_size=batch_size, local_epochs=int(train["local_epochs"]),
                                  rounds=plan["head"] + plan["encoder"], prior_history=ledger.history,
                                  prototype_share=float(recipe["prototype_share"]) if plan["prototypes"] else None)
            ledger.runs[run_id] = calib
            log.info("client %s: calibrated sigma=%s for %d planned steps (q=%.4f), prototype sigma=%s",
                     who.client_id, calib.noise_multiplier, calib.planned_steps, q, calib.prototype_noise)
        sigma = calib.prototype_noise if stage == "prototypes" else calib.noise_multiplier
        eps_after = math.inf if sigma is None else epsilon(_after_round(ledger.history, stage, sigma, q, steps),
                                                           delta, accountant)
        if eps_after > budget_epsilon(cfg, who):
            eps_now = epsilon(ledger.history, delta, accountant)
            log.info("client %s declines round %d: eps %.4f -> %.4f would exceed its budget %.4f",
                     who.client_id, server_round, eps_now, eps_after, budget_epsilon(cfg, who))
            return decline("budget", eps_now)
        dp = DPSettings(sigma, float(sample["max_grad_norm"]), accountant, tuple(ledger.history))

    t0 = time.perf_counter()
    model = _fresh_model(cfg, num_labels) if feats is None else _Head(global_state)
    load_trainable(model, global_state)
    LAST_TIMINGS["model_s"] = time.perf_counter() - t0
    device = select_device(who.device or train["device"])
    shuffle_seed = None if dp_on else int(_key(cfg["seed"], who.client_id, server_round)[:15], 16)
    outside_weight = float(train.get("outside_weight", 1.0))  # token classification; absent from old configs
    t0 = time.perf_counter()
    if stage == "encoder":
        result = local_train(
            model, data, epochs=int(train["local_epochs"]), batch_size=batch_size,
            lr=float(train["lr"]), weight_decay=float(train["weight_decay"]),
            optimizer=str(train["optimizer"]), dp=dp, device=device,
            max_physical_batch_size=who.max_physical_batch_size or train["max_physical_batch_size"],
            amp_dtype=autocast_dtype(device, train["precision"]),
            grad_sample_mode=str(train["grad_sample_mode"]), shuffle_seed=shuffle_seed,
            outside_weight=outside_weight,
        )
        history = result.history
    else:
        if feats is None:
            feats = client_features(cfg, who, model, data, device)
        LAST_TIMINGS["features_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        if stage == "prototypes":
            sums = release_prototypes(*feats.tensors, num_labels, dp.noise_multiplier if dp is not None else None)
            history = None if dp is None else _after_round(dp.prior_history, stage, dp.noise_multiplier, q, steps)
        else:
            # DP-SGD on the head alone: the encoder is frozen in this stage, so its cached
            # features are exactly what a full forward pass would feed the head.
            result = local_train(
                model.classifier, feats, epochs=int(train["local_epochs"]), batch_size=batch_size,
                lr=float(recipe["head_lr"]), weight_decay=float(train["weight_decay"]),
                optimizer=str(train["optimizer"]), dp=dp, device=device,
                shuffle_seed=shuffle_seed, features=True, outside_weight=outside_weight,
            )
            history = result.history
    LAST_TIMINGS["train_s"] = time.perf_counter() - t0
    local = trainable_state(model)
    update = {k: (local[k].cpu() - torch.as_tensor(global_state[k])).contiguous() for k in local}
    if stage == "prototypes":
        # The round's reply is the release itself in the head's weight; the server turns the
        # sum of all clients' releases into the head (common.recipe.head_from_prototypes).
        update = {k: torch.zeros_like(v) for k, v in update.items()}
        update[f"{HEAD_PREFIX}weight"] = sums.to(update[f"{HEAD_PREFIX}weight"].dtype)

    protection = None
    if dp is not None:
        ledger.history = [tuple(h) for h in history]
        ledger.pin(float(cfg["privacy"]["sample"]["delta"]), dp.accountant)  # the first spend fixes δ
        eps = epsilon(ledger.history, ledger.delta, dp.accountant)
        proto = stage == "prototypes"  # one Gaussian release of sensitivity 1 at q = 1
        protection = {
            "mechanism": "prototype release" if proto else "DP-SGD",
            "sigma": dp.noise_multiplier, "clip_norm": 1.0 if proto else dp.max_grad_norm,
            "sample_rate": 1.0 if proto else q, "steps": steps,
            "epsilon_before": epsilon(list(dp.prior_history), ledger.delta, dp.accountant) if dp.prior_history else 0.0,
            "epsilon_after": eps, "delta": ledger.delta,
        }
    else:
        eps = None  # no guarantee at all: there is no ε to state
    # Write-ahead: the reply and the ledger entry are durable before anything leaves.
    save_reply(who.state_dir, who.client_id, key, update)
    ledger.rounds.append(RoundEntry(run_id, server_round, "trained", eps, reply_key=key,
                                    steps=sum(int(h[2]) for h in ledger.history)))
    ledger.commit(who.state_dir, previous)
    return RoundOutcome(False, "", update, privacy_summary(cfg, who, ledger, run_id), protection=protection)


def _unchanged(ledger: Ledger) -> dict[str, Any]:
    """A round that spent nothing (declined or resent): ε before and after are the ledger's, at its δ."""
    eps = current_epsilon(ledger)
    return {"epsilon_before": eps, "epsilon_after": eps, "delta": ledger.delta}
