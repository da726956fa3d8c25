"""Building the privacy report: the schema-v1 dict, its ε recomputed, its caveats.

The report is derived, never authoritative: every ε in it is recomputed here from the
Opacus histories that clients reported (with :func:`common.privacy.accounting.epsilon`, the
only place ε is computed), so ``fedpriv report RUN_DIR`` can rebuild it at any time
and anyone can check its numbers with Opacus alone. What a client merely claims is not
copied: a round's ε comes from the history cut at that round's cumulative step count
(:func:`common.privacy.accounting.history_prefix`), and the budget from the run's config
(``privacy.sample.epsilon``, ``privacy.sample.client_budgets``); a lower cap that only
the device knows (its node-config ``max-epsilon``) is shown as reported by the device.

This module also holds the schema's constants (the caveat sentences, the budget
sources; the units' words are :mod:`common.privacy.units`'). It imports nothing heavier
than the accountant, so code that only needs a constant does not pay for the renderers
or matplotlib.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from common import __version__
from common.config.schema import PRIVACY_MODES
from common.errors import ConfigError
from common.personal import CAVEAT_PERSONAL, summary
from common.privacy.accounting import (
    ACCOUNTANTS,
    client_epsilon,
    client_history,
    client_level_sigma,
    history_prefix,
    spent_epsilon,
)
from common.privacy.discrete import MECHANISM, MODULUS, SkellamEntry, entries_prefix
from common.privacy.distributed import DistributedNoise
from common.privacy.units import CLIENT_UNIT, SAMPLE_UNIT, SENTENCE_UNIT

SCHEMA_VERSION = 1
MODES = PRIVACY_MODES  # the config's own list: a report accepts exactly the modes a run can have

# Scripts grep for this exact sentence; do not reword it.
CAVEAT_EVAL_METRICS = "evaluation metrics are released without DP noise"
CAVEAT_HELD_OUT = (
    "The evaluation block (the final model's per-class precision, recall, F1 and support, its "
    "macro and weighted F1 and its confusion matrix) and each round's macro_f1 and weighted_f1 "
    "are computed on the server's held-out test set, not on any client's data, and released "
    "without DP noise, like accuracy and loss: as functions of the released model they add "
    "nothing to the clients' ε, but they describe the held-out set exactly (support is its "
    "count of each class) and protect none of its examples."
)
CAVEAT_HELD_OUT_ENTITIES = (
    "The evaluation block (the final model's per-entity precision, recall, F1 and support, its "
    "entity-level micro, macro and weighted F1, from seqeval) and each round's micro_f1, "
    "macro_f1 and weighted_f1 are computed on the server's held-out test sentences, not on "
    "any client's data, and released without DP noise, like accuracy (of word tags) and loss: "
    "as functions of the released model they add nothing to the clients' ε, but they describe "
    "the held-out set exactly (support is its count of each entity type) and protect none of "
    "its sentences."
)
CAVEAT_NO_CSPRNG = (
    "No cryptographically secure random number generator is used: DP noise and Poisson "
    "sampling are drawn from torch's generator seeded from os.urandom "
    "(torchcsprng does not install)."
)
CAVEAT_RELEASED_TO_SERVER = (
    "Released to the server without DP noise, as exact values: per round, the counts "
    "clients_trained, clients_declined, clients_rejected, clients_failed and clients_missing "
    "(all in metrics.jsonl; all but clients_missing in this report's rounds), and the ids of "
    "the clients that declined, with their decline reason, and of those rejected or failed "
    "(metrics.jsonl); per client (clients_reported.json and this report), its client id, "
    "decline flags, the rounds it trained in (per_round) and how many it declined, whether "
    "it exhausted its budget, and its whole Opacus history (σ, q, steps of every entry), "
    "from which its ε follows."
)
CAVEAT_NEIGHBOURS = (
    "Sample-level ε is for add/remove-one neighbouring datasets: two datasets are "
    "neighbours when they differ by one training example of one client."
)
CAVEAT_NO_DP = (
    "privacy.mode is none: no differential privacy is applied and no formal privacy guarantee holds for this run."
)

#: Where each client's ``budget_epsilon`` comes from.
BUDGET_RUN = "run"  # privacy.sample.epsilon
BUDGET_CLIENT_BUDGETS = "client_budgets"  # privacy.sample.client_budgets[client_id]
BUDGET_DEVICE = "reported by the device"  # lower than both: its node-config max-epsilon (unverifiable)

#: Where per-client figures are when the run asked for them but the report has none (deployment).
SOURCE_ON_DEVICES = (
    "Per-client figures are computed on each device from its own held-out data and stay there "
    "(its state directory; fedpriv device-log shows them to its owner): they are not released "
    "by the federation, so this report has none."
)

#: The report's ``evaluation`` block, in this order (server.round.evaluate.Evaluation.block).
EVALUATION_KEYS = (
    "round",
    "num_examples",
    "accuracy",
    "loss",
    "macro_f1",
    "weighted_f1",
    "labels",
    "per_class",
    "confusion_matrix",
)

#: task=token_classification's block (server.round.evaluate.TokenEvaluation.block): entity-level
#: scores from seqeval, keyed by the entity types as the data names them; ``words_cut``
#: counts the test words ``train.max_length`` cut off (scored as predicted O).
TOKEN_EVALUATION_KEYS = (
    "round",
    "num_examples",
    "accuracy",
    "loss",
    "micro_f1",
    "macro_f1",
    "weighted_f1",
    "labels",
    "per_entity",
    "words_cut",
)

ROUND_KEYS = (
    "round",
    "accuracy",
    "loss",
    "macro_f1",
    "weighted_f1",
    "clients_trained",
    "clients_declined",
    "clients_rejected",
    "clients_failed",
)
#: task=token_classification's rounds add the entity-level micro F1 (seqeval).
TOKEN_ROUND_KEYS = (*ROUND_KEYS[:3], "micro_f1", *ROUND_KEYS[3:])


def build_report(
    *,
    config: dict,
    clients_reported: dict,
    rounds: list[dict],
    client_level: dict | None = None,
    evaluation: dict | None = None,
    client_evaluation: dict | None = None,
) -> dict:
    """The schema-v1 report dict of DESIGN.md.

    ``config`` is the resolved config; ``clients_reported`` the parsed
    ``clients_reported.json`` (``{"run_id": ..., "clients": {id: entry}}``); ``rounds``
    the rows of ``metrics.jsonl``; ``client_level`` the server's client-level block
    (the disabled block when ``None``), its ε recomputed from its mechanism
    (:func:`_client_level`); ``evaluation`` the final model's block
    (``evaluation.json``), ``None`` for a run that wrote none (one from before per-class
    results, or stopped before round 1): the report's ``evaluation`` is then null;
    ``client_evaluation`` the simulated devices' own per-client figures
    (``client_evaluation.json``), which a run that asked for them (``data.client_test_fraction``
    > 0 or ``personalize``) shows as ``evaluation.per_client`` beside the global test figures.

    Each client's ε is recomputed from its history with the report's δ and accountant
    rather than copied from what the client said, so the JSON is self-consistent: the
    snippet in the report reproduces every ``epsilon`` field exactly.
    """
    privacy = config.get("privacy") or {}
    mode = privacy.get("mode")
    if mode not in MODES:
        raise ConfigError("privacy.mode", f"{mode!r} is not one of {list(MODES)}")
    sample_cfg = privacy.get("sample") or {}
    sample_on = mode in ("sample", "both")

    delta = float(sample_cfg["delta"]) if sample_on else None
    accountant = str(sample_cfg["accountant"]) if sample_on else None
    if sample_on and accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.sample.accountant", f"{accountant!r} is not one of {sorted(ACCOUNTANTS)}")
    entries = _sorted_entries((clients_reported.get("clients") or {}).items())
    derived = [_client_row(cid, entry, delta, accountant, sample_cfg) for cid, entry in entries] if sample_on else []
    clients = [row for row, _ in derived]

    level, level_caveats = _client_level(client_level if client_level is not None else _disabled_client_level())
    ordered = sorted(rounds, key=lambda r: r["round"])
    round_keys = TOKEN_ROUND_KEYS if config.get("task") == "token_classification" else ROUND_KEYS
    final, stale = _final_evaluation(evaluation, ordered)
    report = {
        "schema_version": SCHEMA_VERSION,
        "fedpriv_version": __version__,
        "config": config,
        "sample_level": {
            "enabled": sample_on,
            "unit": sample_unit(config),
            "accountant": accountant,
            "delta": delta,
            "clients": clients,
        },
        "client_level": level,
        "secure_aggregation": bool(config["secagg"]),
        "rounds": [{key: row.get(key) for key in round_keys} for row in ordered],
        "evaluation": final,
    }
    if sample_on and "noise" in sample_cfg:
        report["sample_level"]["noise"] = str(sample_cfg["noise"])
        if sample_cfg["noise"] == "distributed":
            report["sample_level"]["distributed"] = _distributed_block(config)
    if final is not None and _asks_per_client(config):
        final.update(_per_client(client_evaluation, final.get("round")))
    reported = [entry for _, entry in entries] if sample_on else []
    dropped = [left_out for _, left_out in derived]
    report["caveats"] = _caveats(report, mode, reported, clients_reported.get("unreported") or {}, dropped)
    report["caveats"] += level_caveats
    personal = (config.get("personalize") or {}).get("name", "none")
    if personal != "none":
        report["caveats"].append(CAVEAT_PERSONAL.format(name=personal))
    if stale is not None:
        last = ordered[-1]["round"] if ordered else None
        report["caveats"].append(
            f"evaluation.json holds the model of round {stale}, not of the last completed round "
            f"({last if last is not None else 'none'}; the run stopped between the two): its per-class "
            "results are left out of this report."
        )
    return report


def round_epsilons(config: dict, clients_reported: dict, client_level: dict | None, server_round: int) -> dict:
    """The report's ε figures as they stand after ``server_round``, recomputed as the report does.

    ``epsilon_max``/``epsilon_min``: the highest and lowest sample-level client ε, each the
    report's ``per_round`` value of the client's last round up to ``server_round`` (its history
    cut at that round's steps), or for a client that only declined in this run its whole
    history's ε (the run did not move it); clients yet to train are left out.
    ``epsilon_client_level``: the client-level block's ε of its last round up to ``server_round``.
    A figure the run does not have is absent. The same history gives the same numbers later,
    so a resumed run's catch-up logs what the first process would have.
    """
    privacy = config.get("privacy") or {}
    sample_cfg = privacy.get("sample") or {}
    out: dict[str, float] = {}
    if privacy.get("mode") in ("sample", "both"):
        delta, accountant = float(sample_cfg["delta"]), str(sample_cfg["accountant"])
        values = []
        for _, entry in _sorted_entries((clients_reported.get("clients") or {}).items()):
            history = [list(h) for h in entry.get("history") or []]
            discrete = _discrete(entry)
            items = [p for p in entry.get("per_round") or [] if isinstance(p, dict)]
            done = [p for p in items if _is_count(p.get("round")) and p["round"] <= server_round]
            if done:
                rows, _ = _per_round(history, {"per_round": done[-1:]}, delta, accountant, None, discrete)
                values += [row["epsilon"] for row in rows]
            elif not items:
                values.append(spent_epsilon(history, discrete, delta, accountant))
        if values:
            out["epsilon_max"], out["epsilon_min"] = max(values), min(values)
    if client_level is not None and client_level.get("enabled"):
        level, _ = _client_level(client_level)
        points = [
            p
            for p in level["per_round"]
            if _is_count(p.get("round")) and p["round"] <= server_round and p.get("epsilon") is not None
        ]
        if points:
            out["epsilon_client_level"] = points[-1]["epsilon"]
    return out


#: Whom each ε of a distributed-noise run trusts, in plain words (the report's assumptions).
DISTRIBUTED_ASSUMPTIONS = [
    "epsilon (against the server and everyone who receives the model) trusts SecAgg+: the server sees "
    "only the sum, and fewer than SecAgg+'s reconstruction threshold of a client's neighbours collude "
    "with it",
    "epsilon also trusts that at least n_min clients added their noise share honestly to every released "
    "sum (the server releases no round with fewer contributors)",
    "epsilon_local trusts nothing: it is the epsilon of the client's own message, its share of the noise "
    "alone, which holds even if SecAgg+ were broken or every other client colluded with the server",
]


def _distributed_block(config: dict) -> dict:
    """The distributed mechanism's parameters and what its ε assumes (``sample_level.distributed``)."""
    noise = DistributedNoise.of(config)
    return {
        "mechanism": MECHANISM,
        "n_min": noise.n_min,
        "granularity": noise.granularity,
        "sample_rate": noise.sample_rate,
        "count_units": noise.count_units,
        "modulus": MODULUS,
        "orders": "integers 2..64, 72, 80, 96, 112, 128, 160, 192, 256",
        "assumptions": list(DISTRIBUTED_ASSUMPTIONS),
    }


def sample_unit(config: dict) -> str:
    """The sample-level unit in words: a sentence for token classification."""
    return SENTENCE_UNIT if config.get("task") == "token_classification" else SAMPLE_UNIT


def _final_evaluation(evaluation: dict | None, rounds: list[dict]) -> tuple[dict | None, object]:
    """(the report's ``evaluation`` block, or None; the round of a block left out as stale).

    The block is the last completed round's model, or nothing: the server writes it just
    before that round's metrics line, so a crash between the two leaves a block of a round
    that never completed, which is not the final model.
    """
    if evaluation is None:
        return None, None
    if not rounds or evaluation.get("round") != rounds[-1]["round"]:
        return None, evaluation.get("round")
    keys = TOKEN_EVALUATION_KEYS if "per_entity" in evaluation else EVALUATION_KEYS
    return {key: evaluation.get(key) for key in keys}, None


def _asks_per_client(config: dict) -> bool:
    """Whether the run asked its devices to evaluate on their own data (or to personalise)."""
    fraction = (config.get("data") or {}).get("client_test_fraction") or 0
    return float(fraction) > 0 or (config.get("personalize") or {}).get("name", "none") != "none"


def _per_client(client_evaluation: dict | None, final_round) -> dict:
    """The evaluation block's per-client keys: ``per_client`` (DESIGN.md's rows), its summary
    (mean, 10th percentile and worst client of each model, recomputed from the rows) and where
    the figures came from. Figures of another round than the final model's are left out."""
    if client_evaluation is None or client_evaluation.get("round") != final_round:
        return {"per_client": [], "per_client_summary": summary([]), "per_client_source": SOURCE_ON_DEVICES}
    rows = [
        {
            "client_id": str(row.get("client_id")),
            "test_examples": row.get("test_examples"),
            "global_accuracy": row.get("global_accuracy"),
            "personal_accuracy": row.get("personal_accuracy"),
        }
        for row in client_evaluation.get("per_client") or []
        if isinstance(row, dict)
    ]
    return {
        "per_client": rows,
        "per_client_summary": summary(rows),
        "per_client_source": client_evaluation.get("source"),
    }


def _disabled_client_level() -> dict:
    return {
        "enabled": False,
        "unit": CLIENT_UNIT,
        "epsilon": None,
        "delta": None,
        "noise_multiplier": None,
        "clipping_norm": None,
        "assumptions": [],
        "per_round": [],
    }


#: A stated client-level number within this relative distance of the recomputed one is kept as
#: stated (σ_eff from the mechanism's two noises differs from the server's σ by float rounding).
CLIENT_LEVEL_RTOL = 1e-9


def _client_level(level: dict) -> tuple[dict, list[str]]:
    """(the client-level block with its numbers recomputed, caveats naming each one replaced).

    ``client_level.json`` is never trusted (DESIGN.md): ε follows from the mechanism's σ_eff
    (:func:`common.privacy.accounting.client_level_sigma`) at q = 1 over the released rounds, at the
    block's δ. The released rounds are the ``per_round`` entries marked released, or the
    block's ``rounds_released`` where it counts more (a resumed run keeps a release whose
    round a crash cut short counted, without its entry); a round's ε is that after its
    entry's cumulative ``releases`` (the released entries up to it where the entry has none).
    A number that disagrees is replaced and said; an entry whose count is impossible is left
    out and said. With no usable mechanism or δ nothing can be recomputed: ε is null and said.
    """
    if not level.get("enabled"):
        return level, []
    level = dict(level)
    entries = [dict(p) for p in level.get("per_round") or [] if isinstance(p, dict)]
    stated = level.get("epsilon")
    try:
        sigma = client_level_sigma(level.get("mechanism"))
        delta = level.get("delta")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"client_level.delta is {delta!r}, not a number in (0, 1)")
    except ValueError as err:
        level["epsilon"] = None
        level["per_round"] = [{**p, "epsilon": None} for p in entries]
        return level, [
            f"client_level.json stated client-level ε {_json(stated)}, which cannot be recomputed: "
            f"{err}. The report shows no client-level ε (null), per round neither."
        ]

    released = [bool(p.get("released", True)) for p in entries]
    total = sum(released)
    counted = level.get("rounds_released")
    if _is_count(counted) and counted > total:
        total = counted
    level["per_round"], changed, dropped = _client_level_rounds(entries, released, sigma, delta, total)
    caveats = _client_level_totals(level, stated, sigma, delta, total)
    if changed:
        caveats.append(
            f"client_level.json stated a client-level ε for round(s) {', '.join(map(str, changed))} that "
            "its mechanism does not give; the report shows the ε recomputed after each round's releases."
        )
    if dropped:
        caveats.append(
            f"client_level.json's entry for round(s) {', '.join(map(str, dropped))} states a count of "
            "released rounds that cannot be (not an integer, fewer than the releases before it, or more "
            "than the run released): its client-level ε cannot be derived and is left out."
        )
    return level, caveats


def _client_level_rounds(entries: list[dict], released: list[bool], sigma: float, delta: float, total: int):
    """(per-round rows with ε recomputed, rounds whose ε was replaced, rounds left out)."""
    rows, changed, dropped, seen, floor = [], [], [], 0, 0
    for entry, was_released in zip(entries, released):
        seen += was_released
        count = entry.get("releases", seen)
        if not _is_count(count) or not max(seen, floor) <= count <= total:
            dropped.append(entry.get("round"))
            continue
        floor = count
        eps = client_epsilon(sigma, count, delta)
        if not _same(entry.get("epsilon"), eps):
            changed.append(entry.get("round"))
            entry["epsilon"] = eps
        rows.append(entry)
    return rows, changed, dropped


def _client_level_totals(level: dict, stated, sigma: float, delta: float, total: int) -> list[str]:
    """Replace ``level``'s ε, σ, history and release count by what the mechanism gives; say each."""
    caveats = []
    eps = client_epsilon(sigma, total, delta)
    if not _same(stated, eps):
        level["epsilon"] = eps
        caveats.append(
            f"client_level.json stated client-level ε {_json(stated)}; recomputed from the mechanism "
            f"(σ = {sigma:.4g}) and {total} released rounds at δ = {delta:g}: {eps:.4g}, which the "
            "report shows."
        )
    if not _same(level.get("noise_multiplier"), sigma):
        caveats.append(
            f"client_level.json stated noise multiplier {_json(level.get('noise_multiplier'))}; its "
            f"mechanism gives σ = {sigma:.4g}, which the report shows."
        )
        level["noise_multiplier"] = sigma
    if "history" in level:
        history = [list(h) for h in client_history(level["noise_multiplier"], total)]
        if not _same_history(level["history"], history):
            caveats.append(
                f"client_level.json stated history {_json(level['history'])}; the mechanism and "
                f"{total} released rounds give {_json(history)}, which the report shows."
            )
            level["history"] = history
    if "rounds_released" in level and level["rounds_released"] != total:
        caveats.append(
            f"client_level.json stated {_json(level['rounds_released'])} rounds released; its per-round "
            f"entries give {total}, which the report shows."
        )
        level["rounds_released"] = total
    return caveats


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _same(stated: object, derived: float) -> bool:
    """``stated`` is ``derived`` up to float rounding (:data:`CLIENT_LEVEL_RTOL`)."""
    return (
        isinstance(stated, (int, float))
        and not isinstance(stated, bool)
        and math.isclose(stated, derived, rel_tol=CLIENT_LEVEL_RTOL, abs_tol=0.0)
    )


def _same_history(stated: object, derived: list[list]) -> bool:
    if not isinstance(stated, list) or len(stated) != len(derived):
        return False
    for s, d in zip(stated, derived):
        if (
            not isinstance(s, list)
            or len(s) != 3
            or not (_same(s[0], d[0]) and _same(s[1], d[1]) and _is_count(s[2]) and s[2] == d[2])
        ):
            return False
    return True


def _json(value: object) -> str:
    return json.dumps(value)


def _sorted_entries(items: Iterable[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Numeric ids in numeric order (2 before 10), then any other ids alphabetically."""

    return sorted(items, key=lambda item: _id_order(str(item[1].get("client_id", item[0]))))


def _id_order(client_id: str) -> tuple[int, int, str]:
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def _discrete(entry: dict) -> list[SkellamEntry]:
    """A client's distributed-noise releases as it reported them (``[]`` for none or unreadable)."""
    try:
        return [SkellamEntry.from_json(e) for e in entry.get("discrete") or []]
    except (KeyError, TypeError, ValueError):
        return []


def _client_row(key: str, entry: dict, delta: float, accountant: str, sample_cfg: dict) -> tuple[dict, list]:
    """(one client's row, rounds whose ε could not be derived): ε, per-round ε and budget
    are derived here, never copied from ``entry``.

    With distributed noise (``discrete`` releases) ε composes the Gaussian history with the
    Skellam releases (``common.privacy.accounting.spent_epsilon``), ``epsilon_local`` is the same
    at one share each, and the row's ``history`` ends with each release's Gaussian equivalent
    (one entry per ``discrete`` entry, in order), so Opacus on it gives a lower bound of ε."""
    history = [list(h) for h in entry.get("history") or []]
    discrete = _discrete(entry)
    last = list(discrete[-1].gaussian()) if discrete else history[-1] if history else None
    client_id = str(entry.get("client_id", key))
    budget, source = _budget(client_id, entry, sample_cfg)
    spent = spent_epsilon(history, discrete, delta, accountant)
    per_round, dropped = _per_round(history, entry, delta, accountant, spent, discrete)
    row = {
        "client_id": client_id,
        "budget_epsilon": budget,
        "budget_source": source,
        "epsilon": spent,
        "noise_multiplier": last[0] if last else entry.get("noise_multiplier"),
        "max_grad_norm": sample_cfg.get("max_grad_norm", entry.get("max_grad_norm")),
        "sample_rate": last[1] if last else entry.get("sample_rate"),
        "steps": sum(int(h[2]) for h in history),
        "history": history,
        "rounds_participated": entry.get("rounds_participated", 0),
        "rounds_declined": entry.get("rounds_declined", 0),
        "exhausted": bool(entry.get("exhausted", False)),
        "per_round": per_round,
    }
    if discrete or "discrete" in entry:
        row["history"] = history + [list(e.gaussian()) for e in discrete]
        row["steps"] = sum(int(h[2]) for h in row["history"])
        row["discrete"] = [e.to_json() for e in discrete]
        row["epsilon_local"] = spent_epsilon(history, discrete, delta, accountant, local=True) if discrete else spent
    return row, dropped


def _budget(client_id: str, entry: dict, sample_cfg: dict) -> tuple[float | None, str]:
    """(budget ε, source): the run's config decides; a device may only report a *lower* cap."""
    run = sample_cfg.get("epsilon")
    budget, source = (float(run), BUDGET_RUN) if run is not None else (None, BUDGET_RUN)
    caps = {str(k): v for k, v in (sample_cfg.get("client_budgets") or {}).items()}
    if caps.get(client_id) is not None and (budget is None or float(caps[client_id]) < budget):
        budget, source = float(caps[client_id]), BUDGET_CLIENT_BUDGETS
    claimed = entry.get("budget_epsilon")
    try:
        claimed = float(claimed) if claimed is not None else None
    except (TypeError, ValueError):
        claimed = None
    if claimed is not None and claimed >= 0 and (budget is None or claimed < budget):
        budget, source = claimed, BUDGET_DEVICE  # max-epsilon lives only on the device
    return budget, source


def _per_round(
    history: list,
    entry: dict,
    delta: float,
    accountant: str,
    spent: float | None = None,
    discrete: list[SkellamEntry] | None = None,
) -> tuple[list[dict], list]:
    """(per-round ε recomputed from the history prefix at each round's steps, rounds left out).

    A round is left out when its entry gives no integer round or no usable cumulative step
    count (absent, not an integer, decreasing, or more than the history holds): its ε cannot be derived, and
    the client's own number is never copied.
    """
    discrete = discrete or []
    out, dropped, floor, released_floor = [], [], 0, 0
    total = (sum(int(h[2]) for h in history), sum(e.steps for e in discrete))
    known: dict[tuple, float] = {} if spent is None else {total: spent}  # PRV costs ~0.6 s an ε
    for item in entry.get("per_round") or []:
        if not isinstance(item, dict):
            continue
        steps, rnd = item.get("steps"), item.get("round")
        try:
            if not isinstance(rnd, int) or isinstance(rnd, bool):
                raise ValueError(rnd)
            if isinstance(steps, bool) or steps is None or int(steps) != float(steps):
                raise ValueError(steps)
            steps = int(steps)
            if steps < floor:
                raise ValueError(steps)
            prefix = history_prefix(history, steps)
            releases = item.get("releases", 0) if discrete else 0
            if isinstance(releases, bool) or releases is None or int(releases) != float(releases):
                raise ValueError(releases)
            releases = int(releases)
            if releases < released_floor:
                raise ValueError(releases)
            released = entries_prefix(discrete, releases)
        except (TypeError, ValueError, OverflowError):
            dropped.append(rnd)
            continue
        floor, released_floor = steps, releases
        if (steps, releases) not in known:
            known[(steps, releases)] = spent_epsilon(prefix, released, delta, accountant)
        row = {"round": rnd, "epsilon": known[(steps, releases)], "steps": steps}
        if discrete:
            row["releases"] = releases
            row["epsilon_local"] = spent_epsilon(prefix, released, delta, accountant, local=True)
        out.append(row)
    return out, dropped


def _caveats(
    report: dict, mode: str, reported: list[dict], unreported: dict, dropped: list[list] | None = None
) -> list[str]:
    """Plain sentences about what the ε does not cover or what the run revealed.

    ``reported`` holds the clients' own entries, in the order of the report's clients;
    ``unreported`` maps a client id to the rounds whose reply never reached the server;
    ``dropped`` the rounds of each client whose per-round ε could not be derived.
    """
    return [*_run_caveats(report, mode), *_client_caveats(report["sample_level"], reported, unreported, dropped)]


def _run_caveats(report: dict, mode: str) -> list[str]:
    """What the run's settings leave uncovered or reveal, whichever clients took part."""
    caveats = [CAVEAT_EVAL_METRICS]
    if report["config"].get("task") == "token_classification":
        caveats.append(CAVEAT_HELD_OUT_ENTITIES)
    elif report["evaluation"] is not None or any(r.get("macro_f1") is not None for r in report["rounds"]):
        caveats.append(CAVEAT_HELD_OUT)
    caveats += [
        CAVEAT_NO_CSPRNG,
        CAVEAT_RELEASED_TO_SERVER,
        CAVEAT_NEIGHBOURS,
    ]
    if mode in ("sample", "both"):
        caveats.append(_caveat_sample_rate(report["config"]))
    if (report["config"].get("recipe") or {}).get("prototypes"):
        caveats.append(_caveat_prototypes(mode))
    if mode == "none":
        caveats.append(CAVEAT_NO_DP)
    precision = (report["config"].get("train") or {}).get("precision", "fp32")
    if mode in ("sample", "both") and precision != "fp32":
        caveats.append(
            f"train.precision={precision}: on CUDA, per-example gradient norms are computed in "
            "reduced precision, so a clipped gradient may exceed max_grad_norm by their rounding "
            "error (about 2^-8 relative for bf16); the sample-level ε does not account for that."
        )
    if report["client_level"].get("enabled"):
        caveats.append(
            "Client-level ε is for add/remove-one-client neighbouring datasets: two "
            "datasets are neighbours when they differ by all data of one client."
        )
    optimizer = (report["config"].get("strategy") or {}).get("name", "fedavg")
    if optimizer != "fedavg":
        caveats.append(
            f"The server optimizer (strategy {optimizer}) is applied to the released aggregates only: "
            "post-processing, so every ε in this report covers it."
        )
    if not report["secure_aggregation"]:
        caveats.append("Secure aggregation is off: the server sees each client's individual update.")
    dist = report["sample_level"].get("distributed")
    if dist is not None:
        caveats.append(
            f"Distributed noise: each client added only a share (1/{dist['n_min']}) of the noise to its "
            "integer update, and the server learnt only the exact SecAgg+ sum. Each client's epsilon "
            "holds only if SecAgg+ holds and at least n_min clients added their shares; its "
            "epsilon_local (far larger) is what its own message alone reveals, trusting no one. The "
            "bound is the Skellam mechanism's (Agarwal, Kairouz & Liu 2021) with Zhu & Wang's subsampling "
            "bound at integer RDP orders; its history's last entries are Gaussian equivalents, whose "
            "Opacus epsilon is a lower bound."
        )
    return caveats


def _client_caveats(sample: dict, reported: list[dict], unreported: dict, dropped: list[list] | None) -> list[str]:
    """Per client, what its report disagrees with, leaves out or exceeds; then the replies that never came."""
    caveats = []
    for row, entry, left_out in zip(sample["clients"], reported, dropped or [[]] * len(reported)):
        cid = row["client_id"]
        # A client that accounted with another δ or accountant reports an ε the report
        # cannot reproduce; say so rather than silently overwrite it.
        for name, expected in (("delta", sample["delta"]), ("accountant", sample["accountant"])):
            claimed = entry.get(name)
            if claimed is not None and claimed != expected:
                caveats.append(
                    f"Client {cid} reported {name} {claimed!r} but the run uses "
                    f"{expected!r}; its ε here is recomputed with {expected!r}."
                )
        if left_out:
            caveats.append(
                f"Client {cid}'s per-round ε for round(s) {', '.join(map(str, left_out))} cannot be "
                "derived from its history (no usable step count in its report) and is left out; "
                "its total ε is recomputed from the whole history."
            )
        if row["budget_source"] == BUDGET_DEVICE:
            caveats.append(
                f"Client {cid}'s budget {float(row['budget_epsilon']):g} is its own cap as reported by "
                "the device (node-config max-epsilon), lower than the run's; the server cannot verify it."
            )
        budget = row["budget_epsilon"]
        if budget is not None and row["epsilon"] > float(budget):
            caveats.append(f"Client {cid} has spent ε = {row['epsilon']:.4f}, more than its budget {float(budget):g}.")
    for cid, rounds in sorted(unreported.items(), key=lambda kv: _id_order(kv[0])):
        caveats.append(
            f"Client {cid}'s reply for round(s) {', '.join(map(str, rounds))} never reached the "
            "server (timeout or failure). If it trained anyway, it spent more than this report "
            "shows; the ledger on the client is authoritative and its next report includes it."
        )
    return caveats


def _caveat_prototypes(mode: str) -> str:
    """What the recipe's round-1 prototype release revealed, and what covers it."""
    return (
        "Round 1 released DP class prototypes (recipe.prototypes): each client sent its per-class "
        "sums of unit-norm pooled features, for all classes and with no per-class counts. "
        + (
            "Every entry carried N(0, σ_p²) noise at sensitivity 1 (one example moves one class's sum "
            "by norm at most 1); the release is one (σ_p, q = 1, 1 step) entry of each client's history, "
            "and its ε is included above. "
            if mode in ("sample", "both")
            else "Without sample-level DP these sums carry no per-example noise. "
        )
        + "The server turned their sum into the head's starting weights (post-processing)."
    )


def _caveat_sample_rate(config: dict) -> str:
    """How a client's (q, steps) reveal its example count n, with this run's batch size."""
    train = config.get("train") or {}
    b = train.get("batch_size")
    if b is None:
        rate = train.get("sample_rate")
        return (
            "Each client's batch size is train.sample_rate × n (B = round("
            f"{rate if rate is not None else 0.25} n)), so its sample rate q = 1/ceil(n/B) and its steps per round "
            "are the same for almost every n: its history reveals little about its example count "
            "(only through the rounding of B, for very small n). Histories are sent in plain "
            "text, with secure aggregation too."
        )
    size = f"B = {b}, train.batch_size" if b is not None else "B = train.batch_size"
    return (
        "Each client's sample rate and steps reveal its example count n: Opacus includes each "
        f"example with probability 1/ceil(n/B) ({size}), draws s = int(1/(1/ceil(n/B))) batches "
        "per epoch (ceil(n/B), or one fewer for some n through float rounding) and accounts "
        "q = 1/s; a round's steps are s × train.local_epochs. So every history entry gives "
        "ceil(n/B) to within one, i.e. n to within about two batch sizes; (q, steps) change only "
        "when n crosses a "
        "multiple of B. This holds with secure aggregation too: histories are sent in plain text."
    )
