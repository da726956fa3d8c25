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

:func:`_locked_round` is that order, one function a step: :func:`_resend` (2),
:func:`_decide` (3–5), :func:`_train_stage` and :func:`_commit` (6).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from client.device import autocast_dtype, select_device
from client.privacy.ledger import (
    Ledger,
    LedgerBusy,
    RoundEntry,
    RunCalibration,
    load_reply,
    locked,
    reply_key,
    save_reply,
)
from client.privacy.node_config import ClientIdentity
from client.privacy.policy import REASON_DELTA
from client.training import distributed as distributed_release
from client.training.dp_train import (
    DPSettings,
    TrainSettings,
    calibrate_run,
    local_train,
    planned_steps_per_round,
    release_prototypes,
)
from common.data.cache import DATA_CACHE, BoundedCache, key_of
from common.data.features import (
    cached_features,
    data_digests,
    data_files,
    feature_key,
    features_key_parts,
    frozen_features,
    stored_features,
)
from common.data.partition import load_client_data
from common.data.sources import load_local_data
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import load_trainable, state_digest, trainable_state
from common.privacy.accounting import (
    append_steps,
    epsilon,
    prototype_entry,
    sample_rate,
    spent_epsilon,
    train_batch_size,
)
from common.privacy.discrete import CLIENT_RANGE, SkellamEntry, append_entry
from common.privacy.distributed import COUNT_KEY, DistributedNoise, distributed
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
    # Where the round's time went on this device (seconds), for client.app's profile line:
    # ``data_s`` (its data read and tokenised), ``model_s`` (the model built or copied),
    # ``features_s`` (its frozen features, computed or read back), ``train_s`` (local training
    # or the prototype release), and ``from_stored_features`` (the round read neither data nor
    # encoder: :func:`_cached_inputs`). Times only: the line leaves the process. Never sent.
    timings: dict[str, Any] = field(default_factory=dict)


# Models and tokenised partitions are costly to rebuild; one process serves many rounds (a
# simulation actor serves every client it is given). The tokenised partitions are kept in the
# process's one bounded data cache (common.data.cache.DATA_CACHE), next to the partitions they
# are cut from; the model (one) and the tokenizer (shared by every client: loading it again
# for each new client cost ~35 ms each) are kept here.
_MODEL_CACHE: dict[str, torch.nn.Module] = {}
_TOKENIZER_CACHE = BoundedCache(maxsize=2)

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

    parts = (
        "tokenised",
        cfg["data"],
        cfg["partition"],
        cfg["seed"],
        cfg["num_clients"],
        tokenizer_name,
        cfg["train"]["max_length"],
        partition_id,
        data_path,
    )
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

    return cached_features(Ledger.directory(who.state_dir, who.client_id), key, compute, digests=digests, n=len(data))


def _features_key(cfg: Mapping, who: ClientIdentity, digests: list[str | None]) -> str:
    return feature_key(*features_key_parts(cfg, who.partition_id, who.data_path, digests))


class _Head(torch.nn.Module):
    """The head of a frozen-encoder model alone, for a round that reads cached features."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]):
        super().__init__()
        out_features, in_features = global_state[f"{HEAD_PREFIX}weight"].shape
        self.classifier = torch.nn.Linear(
            int(in_features), int(out_features), bias=f"{HEAD_PREFIX}bias" in global_state
        )


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
    feats = stored_features(
        Ledger.directory(who.state_dir, who.client_id), _features_key(cfg, who, digests), digests=digests
    )
    if feats is None:
        return None
    return feats, int(global_state[f"{HEAD_PREFIX}weight"].shape[0])


def current_epsilon(ledger: Ledger) -> float | None:
    """The ledger's ε so far (None before its first DP spend, when it has no δ pinned)."""
    if not (ledger.history or ledger.discrete) or ledger.delta is None:
        return None
    return spent_epsilon(ledger.history, ledger.discrete, float(ledger.delta), ledger.accountant)


def local_epsilon(ledger: Ledger) -> float | None:
    """ε of this client's own messages alone (distributed noise: each release at its share only);
    None without distributed releases, where it is the ledger's ε."""
    if not ledger.discrete or ledger.delta is None:
        return None
    return spent_epsilon(ledger.history, ledger.discrete, float(ledger.delta), ledger.accountant, local=True)


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
    if who.policy.max_epsilon is not None:
        caps.append(float(who.policy.max_epsilon))
    return min(caps)


def privacy_summary(cfg: Mapping, who: ClientIdentity, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The client's report entry (clients_reported.json) — recomputable from ``history``."""
    sample = cfg["privacy"]["sample"]
    calib = ledger.runs.get(run_id)
    entries = ledger.run_entries(run_id)
    budget = budget_epsilon(cfg, who)
    summary = {
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
        "per_round": [
            {"round": e.round, "epsilon": e.epsilon, "steps": e.steps} for e in entries if e.status == "trained"
        ],
        "rounds_participated": sum(e.status == "trained" for e in entries),
        "rounds_declined": sum(e.status == "declined" for e in entries),
        "exhausted": bool(entries and entries[-1].status == "declined" and entries[-1].reason == "budget"),
    }
    if ledger.discrete or distributed(cfg):
        # Distributed noise: the releases whose ε trusts SecAgg+ and n_min shares, and the ε of
        # this client's own messages alone; each round's cumulative release count, to recompute per round.
        summary["noise"] = "distributed" if distributed(cfg) else "local"
        summary["discrete"] = [e.to_json() for e in ledger.discrete]
        summary["epsilon_local"] = local_epsilon(ledger)
        by_round = {e.round: e for e in entries if e.status == "trained"}
        for row in summary["per_round"]:
            row["releases"] = by_round[row["round"]].releases
            row["epsilon_local"] = by_round[row["round"]].epsilon_local
    return summary


#: Decline reasons: fixed texts (with the setting's name), since they leave the device.
REASON_BUSY = "busy: another round holds this client's ledger"
REASON_DELTA_N = "privacy.sample.delta: not below 1/n for this device's data"


@dataclass(frozen=True)
class _Round:
    """One training request being answered: what every step of the round reads, and where
    its time goes (the outcome's ``timings``)."""

    cfg: Mapping
    who: ClientIdentity
    run_id: str
    server_round: int
    global_state: Mapping[str, torch.Tensor]
    timings: dict[str, Any]


@dataclass(frozen=True)
class _Inputs:
    """This round's examples: ``data`` (tokenised), or None with ``feats``, its stored
    features (:func:`_cached_inputs`)."""

    data: Any
    feats: Any
    num_labels: int

    @property
    def n(self) -> int:
        return len(self.data) if self.data is not None else len(self.feats)


@dataclass(frozen=True)
class RoundPlan:
    """What this round would run and spend, fixed before it is decided: the budget check
    accounts exactly this q and these steps, and the round then trains with them."""

    stage: str  # common.recipe.STAGES
    n: int  # this device's examples (never sent)
    batch_size: int
    sample_rate: float  # q
    steps: int  # DP-SGD steps of this round; 1 for the prototype release


@dataclass(frozen=True)
class Decline:
    """A round the device's checks refuse: nothing trains, nothing is spent."""

    reason: str  # a fixed text: it leaves the device
    epsilon: float | None  # the ledger's ε now, before and after this round


def run_round(
    cfg: Mapping,
    who: ClientIdentity,
    *,
    run_id: str,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
) -> RoundOutcome:
    """Answer the server's training request for ``server_round``, one round per client at a time."""
    r = _Round(
        cfg,
        who,
        run_id,
        server_round,
        global_state,
        timings={"server_round": server_round, "stage": stage_of(cfg, server_round)},
    )
    t0 = time.perf_counter()
    cached = _cached_inputs(cfg, who, r.timings["stage"], global_state)
    if cached is None:
        data, label_names = _client_data(cfg, who.partition_id, who.data_path)
        inputs = _Inputs(data, None, len(label_names))
    else:
        inputs = _Inputs(None, *cached)
    r.timings.update(data_s=time.perf_counter() - t0, from_stored_features=cached is not None)
    try:
        with locked(who.state_dir, who.client_id, timeout=float(cfg["round_timeout_s"])):
            return _locked_round(r, inputs)
    except LedgerBusy:
        log.warning("client %s declines round %d: its ledger is held by another round", who.client_id, server_round)
        ledger = Ledger.load(who.state_dir, who.client_id)  # atomic writes: a consistent read
        return _outcome(r, ledger, None, REASON_BUSY, protection=_unchanged(ledger))


def _locked_round(r: _Round, inputs: _Inputs) -> RoundOutcome:
    """One round under the client's lock, in the contract's order (module docstring)."""
    key = reply_key(r.run_id, r.server_round, state_digest(r.global_state))
    ledger = Ledger.load(r.who.state_dir, r.who.client_id)
    done = ledger.entry(r.run_id, r.server_round)
    if done is not None:
        return _resend(r, ledger, done, key)
    previous = copy.deepcopy(ledger)  # the ledger as read: what a commit must extend
    plan = _plan(r, inputs.n)
    dp = _decide(r, ledger, plan)  # σ and C for this round; None without sample-level DP
    if isinstance(dp, Decline):
        return _decline(r, ledger, previous, dp)
    update, history = _train_stage(r, inputs, plan, dp)
    return _commit(r, ledger, previous, plan, dp, update, history, key)


def _outcome(
    r: _Round,
    ledger: Ledger,
    update: dict[str, torch.Tensor] | None,
    reason: str = "",
    *,
    protection: dict[str, Any] | None,
    resent: bool = False,
) -> RoundOutcome:
    """Every answer of a round: a decline is exactly an answer without an update; each carries
    the ledger's summary as it now stands and the round's timings."""
    return RoundOutcome(
        update is None,
        reason,
        update,
        privacy_summary(r.cfg, r.who, ledger, r.run_id),
        resent=resent,
        protection=protection,
        timings=r.timings,
    )


def _resend(r: _Round, ledger: Ledger, done: RoundEntry, key: str) -> RoundOutcome:
    """A round the ledger already holds is answered from it again: no new spend."""
    kept = load_reply(r.who.state_dir, r.who.client_id, done.reply_key) if done.status == "trained" else None
    if done.status == "trained" and done.reply_key == key and kept is not None:
        log.info("client %s: round %d already answered; resending the kept reply", r.who.client_id, r.server_round)
        return _outcome(r, ledger, kept, resent=True, protection=_unchanged(ledger))
    if done.status == "declined":
        return _outcome(r, ledger, None, done.reason, resent=True, protection=_unchanged(ledger))
    # Trained for this round on other global weights (or the reply was lost):
    # training again would spend twice for one round, so decline instead.
    return _outcome(r, ledger, None, "already-trained", resent=True, protection=_unchanged(ledger))


def _sample_level(cfg: Mapping) -> bool:
    """Whether this run's rounds spend sample-level DP on the device (DP-SGD, the noised release)."""
    return cfg["privacy"]["mode"] in ("sample", "both")


def _plan(r: _Round, n: int) -> RoundPlan:
    """The stage of ``r.server_round`` and the batch size, q and steps it would run on ``n`` examples."""
    train = r.cfg["train"]
    stage = stage_of(r.cfg, r.server_round)
    if distributed(r.cfg):  # one release a round: the prototype sums, or one head step
        return RoundPlan(stage, n, n, DistributedNoise.of(r.cfg).q(stage), 1)
    batch_size = train_batch_size(train, n, private=_sample_level(r.cfg))
    steps = 1 if stage == "prototypes" else planned_steps_per_round(n, batch_size, int(train["local_epochs"]))
    return RoundPlan(stage, n, batch_size, sample_rate(n, batch_size), steps)


def _decide(r: _Round, ledger: Ledger, plan: RoundPlan) -> DPSettings | Decline | None:
    """Whether this round may train, and with which σ and C: None when the run adds no
    sample-level noise, a :class:`Decline` when a check or the budget refuses it."""
    if not _sample_level(r.cfg):
        return None
    sample = r.cfg["privacy"]["sample"]
    delta, accountant = float(sample["delta"]), str(sample["accountant"])
    refused = _delta_refusal(r, ledger, plan.n, delta, accountant)
    if refused is not None:
        return refused
    if distributed(r.cfg):
        return _decide_distributed(r, ledger, plan)
    calib = _calibration(r, ledger, plan)
    sigma = calib.prototype_noise if plan.stage == "prototypes" else calib.noise_multiplier
    eps_after = (
        math.inf
        if sigma is None
        else epsilon(_after_round(ledger.history, plan.stage, sigma, plan.sample_rate, plan.steps), delta, accountant)
    )
    budget = budget_epsilon(r.cfg, r.who)
    if eps_after > budget:
        eps_now = epsilon(ledger.history, delta, accountant)
        log.info(
            "client %s declines round %d: eps %.4f -> %.4f would exceed its budget %.4f",
            r.who.client_id,
            r.server_round,
            eps_now,
            eps_after,
            budget,
        )
        return Decline("budget", eps_now)
    return DPSettings(sigma, float(sample["max_grad_norm"]), accountant, tuple(ledger.history))


@dataclass(frozen=True)
class DistributedDP:
    """A distributed-noise round the device agreed to: its release's mechanism and what it costs."""

    noise: DistributedNoise
    entry: SkellamEntry  # this round's one release (its share's variance: entry.share_mu)
    sigma: float  # the release's Gaussian-equivalent noise multiplier
    prior_history: tuple  # the ledger's Gaussian history (unchanged by this round)
    prior_discrete: tuple  # the ledger's discrete releases before this round


REASON_RANGE = "privacy.sample.distributed.granularity: this device's sums would not fit SecAgg+'s exact range"
REASON_LOCAL_EPSILON = "node-config max-local-epsilon: epsilon of this device's own message would exceed its cap"


def _decide_distributed(r: _Round, ledger: Ledger, plan: RoundPlan) -> DistributedDP | Decline:
    """σ of this release from the run's config alone (every client's share is the same), then the
    budget (ε against the server) and the owner's cap on ``epsilon_local`` (its share alone)."""
    noise = DistributedNoise.of(r.cfg)
    head_shape = tuple(r.global_state[f"{HEAD_PREFIX}weight"].shape)
    calib = ledger.runs.get(r.run_id)
    if calib is None:
        sigma_p, sigma_h = noise.sigmas(head_shape)
        calib = RunCalibration(sigma_h, noise.q("head"), 1, noise.head_rounds, sigma_p)
        ledger.runs[r.run_id] = calib
        log.info(
            "client %s: distributed noise, sigma_eq %s (prototypes %s), n_min %d",
            r.who.client_id,
            sigma_h,
            sigma_p,
            noise.n_min,
        )
    sigma = calib.prototype_noise if plan.stage == "prototypes" else calib.noise_multiplier
    delta, accountant = float(r.cfg["privacy"]["sample"]["delta"]), str(r.cfg["privacy"]["sample"]["accountant"])
    eps_now = spent_epsilon(ledger.history, ledger.discrete, delta, accountant)
    if sigma is None:
        return Decline("budget", eps_now)
    entry = noise.entry(plan.stage, head_shape, sigma)
    if plan.n * noise.granularity + 64 * math.sqrt(entry.share_mu) >= CLIENT_RANGE // 2:
        # Its sums could leave SecAgg+'s exact range (client.secagg.exact_vector): decided from n alone.
        return Decline(REASON_RANGE, eps_now)
    after = append_entry(ledger.discrete, entry)
    budget = budget_epsilon(r.cfg, r.who)
    if spent_epsilon(ledger.history, after, delta, accountant) > budget:
        log.info("client %s declines round %d: its budget %.4f", r.who.client_id, r.server_round, budget)
        return Decline("budget", eps_now)
    cap = r.who.policy.max_local_epsilon
    if cap is not None and spent_epsilon(ledger.history, after, delta, accountant, local=True) > cap:
        log.info("client %s declines round %d: max-local-epsilon %.4f", r.who.client_id, r.server_round, cap)
        return Decline(REASON_LOCAL_EPSILON, eps_now)
    return DistributedDP(noise, entry, float(sigma), tuple(ledger.history), tuple(ledger.discrete))


def _delta_refusal(r: _Round, ledger: Ledger, n: int, delta: float, accountant: str) -> Decline | None:
    """The device's own δ checks: the ledger's pins, δ < 1/n, the owner's cap (node-config
    max-delta, via the device policy's ``delta_limit``)."""
    who, server_round = r.who, r.server_round
    try:
        ledger.check_pins(delta, accountant)
    except ConfigError as err:
        # The server checks simulated clients' ledgers up front (server.round.loop.prepare);
        # a device says only which setting disagrees with its ledger.
        log.warning("client %s declines round %d: %s", who.client_id, server_round, err)
        return Decline(
            f"{err.setting}: differs from this device's ledger",
            spent_epsilon(ledger.history, ledger.discrete, float(ledger.delta), ledger.accountant),
        )
    if not delta < 1 / n:
        log.warning(
            "client %s declines round %d: privacy.sample.delta=%g is not below 1/n = 1/%d",
            who.client_id,
            server_round,
            delta,
            n,
        )
        return Decline(REASON_DELTA_N, spent_epsilon(ledger.history, ledger.discrete, delta, accountant))
    limit = who.policy.delta_limit(n)
    if limit is not None and delta > limit:
        log.warning(
            "client %s declines round %d: privacy.sample.delta=%g is above its cap %g (node-config "
            "max-delta, default min(1e-5, 1/(10 n)))",
            who.client_id,
            server_round,
            delta,
            limit,
        )
        return Decline(REASON_DELTA, spent_epsilon(ledger.history, ledger.discrete, delta, accountant))
    if delta > 1 / (10 * n):
        log.warning(
            "client %s: privacy.sample.delta=%g is above 1/(10 n) for its %d examples: a weak guarantee",
            who.client_id,
            delta,
            n,
        )
    return None


def _calibration(r: _Round, ledger: Ledger, plan: RoundPlan):
    """The run's σ: calibrated on its first round against the prior spend, stored in the
    ledger (committed with this round), and reused by every later round of the run."""
    calib = ledger.runs.get(r.run_id)
    if calib is None:
        sample, recipe, rounds = r.cfg["privacy"]["sample"], recipe_of(r.cfg), stage_rounds(r.cfg)
        calib = calibrate_run(
            sample,
            n=plan.n,
            batch_size=plan.batch_size,
            local_epochs=int(r.cfg["train"]["local_epochs"]),
            rounds=rounds["head"] + rounds["encoder"],
            prior_history=ledger.history,
            prototype_share=float(recipe["prototype_share"]) if rounds["prototypes"] else None,
        )
        ledger.runs[r.run_id] = calib
        log.info(
            "client %s: calibrated sigma=%s for %d planned steps (q=%.4f), prototype sigma=%s",
            r.who.client_id,
            calib.noise_multiplier,
            calib.planned_steps,
            plan.sample_rate,
            calib.prototype_noise,
        )
    return calib


def _decline(r: _Round, ledger: Ledger, previous: Ledger, decline: Decline) -> RoundOutcome:
    """Record the decline in the ledger (durably: a resent round gives the same answer)."""
    ledger.rounds.append(RoundEntry(r.run_id, r.server_round, "declined", decline.epsilon, reason=decline.reason))
    ledger.commit(r.who.state_dir, previous)
    return _outcome(
        r,
        ledger,
        None,
        decline.reason,
        protection={"epsilon_before": decline.epsilon, "epsilon_after": decline.epsilon, "delta": ledger.delta},
    )


def _train_stage(
    r: _Round, inputs: _Inputs, plan: RoundPlan, dp: DPSettings | None
) -> tuple[dict[str, torch.Tensor], list | None]:
    """This round's stage, trained or released: the update to send, and the accountant
    history after it (None without DP)."""
    t0 = time.perf_counter()
    model = _fresh_model(r.cfg, inputs.num_labels) if inputs.feats is None else _Head(r.global_state)
    load_trainable(model, r.global_state)
    r.timings["model_s"] = time.perf_counter() - t0
    device = select_device(r.who.device or r.cfg["train"]["device"])
    t0 = time.perf_counter()
    release = None
    if plan.stage == "encoder":
        history = local_train(model, inputs.data, _train_settings(r, plan, dp, device)).history
    else:
        feats = inputs.feats if inputs.feats is not None else client_features(r.cfg, r.who, model, inputs.data, device)
        r.timings["features_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        if isinstance(dp, DistributedDP):
            update = _distributed_release(r, feats, inputs.num_labels, plan, dp)
            r.timings["train_s"] = time.perf_counter() - t0
            return update, None
        if plan.stage == "prototypes":
            sigma = dp.noise_multiplier if dp is not None else None
            release = release_prototypes(*feats.tensors, inputs.num_labels, sigma)
            history = (
                None if dp is None else _after_round(dp.prior_history, plan.stage, sigma, plan.sample_rate, plan.steps)
            )
        else:
            # DP-SGD on the head alone: the encoder is frozen in this stage, so its cached
            # features are exactly what a full forward pass would feed the head.
            history = local_train(model.classifier, feats, _train_settings(r, plan, dp, device)).history
    r.timings["train_s"] = time.perf_counter() - t0
    return _update(model, r.global_state, release), history


def _distributed_release(
    r: _Round, feats, num_labels: int, plan: RoundPlan, dp: DistributedDP
) -> dict[str, torch.Tensor]:
    """This round's integer release (client.training.distributed): every trainable key (zeros
    where the stage adds nothing) and, for a head step, the noised count."""
    features, labels = feats.tensors[0], feats.tensors[-1]
    if plan.stage == "prototypes":
        release = {
            f"{HEAD_PREFIX}weight": distributed_release.prototype_release(
                features, labels, num_labels, dp.noise, dp.entry
            )
        }
    else:
        release = distributed_release.head_step(dict(r.global_state), features, labels, dp.noise, dp.entry)
    out = {k: release.get(k, torch.zeros(v.shape, dtype=torch.int64)) for k, v in r.global_state.items()}
    out[COUNT_KEY] = release.get(COUNT_KEY, torch.zeros(1, dtype=torch.int64))
    return out


def _train_settings(r: _Round, plan: RoundPlan, dp: DPSettings | None, device: torch.device) -> TrainSettings:
    """How this round's ``local_train`` trains (the encoder stage, or the head on its features)."""
    train = r.cfg["train"]
    shared = {
        "epochs": int(train["local_epochs"]),
        "batch_size": plan.batch_size,
        "dp": dp,
        "device": device,
        "weight_decay": float(train["weight_decay"]),
        "optimizer": str(train["optimizer"]),
        # Without DP a seeded shuffle makes the run reproducible; DP's sampling must stay unpredictable.
        "shuffle_seed": None if dp is not None else int(_key(r.cfg["seed"], r.who.client_id, r.server_round)[:15], 16),
        "outside_weight": float(train["outside_weight"]),  # token classification
    }
    if plan.stage == "head":
        # A linear head on cached features: the recipe's own lr, and no physical batch cap,
        # autocast or ghost clipping (the defaults): those are for the encoder's memory and time.
        return TrainSettings(lr=float(recipe_of(r.cfg)["head_lr"]), features=True, **shared)
    return TrainSettings(
        lr=float(train["lr"]),
        grad_sample_mode=str(train["grad_sample_mode"]),
        max_physical_batch_size=r.who.max_physical_batch_size or train["max_physical_batch_size"],
        amp_dtype=autocast_dtype(device, train["precision"]),
        **shared,
    )


def _update(
    model: torch.nn.Module, global_state: Mapping[str, torch.Tensor], release: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """local − global trainable weights; for the prototype stage, the release instead."""
    local = trainable_state(model)
    update = {k: (local[k].cpu() - torch.as_tensor(global_state[k])).contiguous() for k in local}
    if release is not None:
        # The round's reply is the release itself in the head's weight; the server turns the
        # sum of all clients' releases into the head (common.recipe.head_from_prototypes).
        update = {k: torch.zeros_like(v) for k, v in update.items()}
        update[f"{HEAD_PREFIX}weight"] = release.to(update[f"{HEAD_PREFIX}weight"].dtype)
    return update


def _commit(
    r: _Round,
    ledger: Ledger,
    previous: Ledger,
    plan: RoundPlan,
    dp: DPSettings | None,
    update: dict[str, torch.Tensor],
    history: list | None,
    key: str,
) -> RoundOutcome:
    """Write-ahead: the reply and the ledger entry are durable before anything leaves."""
    protection = None
    eps = None  # without DP there is no guarantee at all: no ε to state
    releases = eps_local = None
    if isinstance(dp, DistributedDP):
        ledger.discrete = append_entry(ledger.discrete, dp.entry)
        ledger.pin(float(r.cfg["privacy"]["sample"]["delta"]), "rdp")
        eps = spent_epsilon(ledger.history, ledger.discrete, ledger.delta, ledger.accountant)
        eps_local = local_epsilon(ledger)
        releases = sum(e.steps for e in ledger.discrete)
        protection = _distributed_protection(plan, dp, ledger, eps, eps_local)
    elif dp is not None:
        ledger.history = [tuple(h) for h in history]
        ledger.pin(float(r.cfg["privacy"]["sample"]["delta"]), dp.accountant)  # the first spend fixes δ
        eps = epsilon(ledger.history, ledger.delta, dp.accountant)
        protection = _protection(plan, dp, ledger, eps)
    save_reply(r.who.state_dir, r.who.client_id, key, update)
    ledger.rounds.append(
        RoundEntry(
            r.run_id,
            r.server_round,
            "trained",
            eps,
            reply_key=key,
            steps=sum(int(h[2]) for h in ledger.history),
            releases=releases,
            epsilon_local=eps_local,
        )
    )
    ledger.commit(r.who.state_dir, previous)
    return _outcome(r, ledger, update, protection=protection)


def _protection(plan: RoundPlan, dp: DPSettings, ledger: Ledger, eps_after: float) -> dict[str, Any]:
    """What protected this round's release and what it cost (RoundOutcome.protection)."""
    proto = plan.stage == "prototypes"  # one Gaussian release of sensitivity 1 at q = 1
    return {
        "mechanism": "prototype release" if proto else "DP-SGD",
        "sigma": dp.noise_multiplier,
        "clip_norm": 1.0 if proto else dp.max_grad_norm,
        "sample_rate": 1.0 if proto else plan.sample_rate,
        "steps": plan.steps,
        "epsilon_before": epsilon(list(dp.prior_history), ledger.delta, dp.accountant) if dp.prior_history else 0.0,
        "epsilon_after": eps_after,
        "delta": ledger.delta,
    }


def _distributed_protection(
    plan: RoundPlan, dp: DistributedDP, ledger: Ledger, eps_after: float, eps_local: float | None
) -> dict[str, Any]:
    """What protected a distributed-noise release: its share, and both ε (RoundOutcome.protection)."""
    entry = dp.entry
    before = spent_epsilon(list(dp.prior_history), list(dp.prior_discrete), ledger.delta, ledger.accountant)
    return {
        "mechanism": f"distributed Skellam ({'prototype release' if plan.stage == 'prototypes' else 'DP-SGD step'})",
        "sigma": dp.sigma,
        "clip_norm": 1.0 if plan.stage == "prototypes" else dp.noise.max_grad_norm,
        "sample_rate": entry.q,
        "steps": entry.steps,
        "epsilon_before": before,
        "epsilon_after": eps_after,
        "delta": ledger.delta,
        "noise_share": {"variance": entry.share_mu, "sum_variance": entry.mu, "n_min": entry.n_min},
        "epsilon_local": eps_local,
    }


def _unchanged(ledger: Ledger) -> dict[str, Any]:
    """A round that spent nothing (declined or resent): ε before and after are the ledger's, at its δ."""
    eps = current_epsilon(ledger)
    return {"epsilon_before": eps, "epsilon_after": eps, "delta": ledger.delta}
