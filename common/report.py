"""The privacy report of a run: built from the run directory, rendered for people.

The report is derived, never authoritative: every ε in it is recomputed here from the
Opacus histories that clients reported (with :func:`common.accounting.epsilon`, the
only place ε is computed), so ``fedpriv report RUN_DIR`` can re-render it at any time
and anyone can check its numbers with Opacus alone. What a client merely claims is not
copied: a round's ε comes from the history cut at that round's cumulative step count
(:func:`common.accounting.history_prefix`), and the budget from the run's config
(``privacy.sample.epsilon``, ``privacy.sample.client_budgets``); a lower cap that only
the device knows (its node-config ``max-epsilon``) is shown as reported by the device.

Three renderings of one dict (schema_version 1 of DESIGN.md):

* ``privacy_report.json`` — full precision, for scripts;
* ``privacy_report.md`` and ``privacy_report.html`` — for a privacy officer: summary
  first, then tables, the meaning of the two privacy levels, how to recompute ε, and
  the caveats. Both come from one list of neutral blocks (:func:`_document`) so that
  they cannot drift apart; the HTML escapes every string because client ids and config
  values are untrusted input.
* ``plots/epsilon_per_round.png`` and ``plots/accuracy_per_round.png``.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Figures are drawn on an explicit Agg canvas, never through pyplot: no display is
# needed, no process-wide backend is switched, and no global figure list leaks memory.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from common import __version__
from common.accounting import ACCOUNTANTS, epsilon, history_prefix
from common.errors import ConfigError
from common.storage import atomic_write_bytes

SCHEMA_VERSION = 1
MODES = ("none", "sample", "client", "both")
SAMPLE_UNIT = "one training example of one client"
CLIENT_UNIT = "all data of one client"

# Scripts grep for this exact sentence; do not reword it.
CAVEAT_EVAL_METRICS = "evaluation metrics are released without DP noise"
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
    "privacy.mode is none: no differential privacy is applied and no formal privacy "
    "guarantee holds for this run."
)

#: Where each client's ``budget_epsilon`` comes from.
BUDGET_RUN = "run"  # privacy.sample.epsilon
BUDGET_CLIENT_BUDGETS = "client_budgets"  # privacy.sample.client_budgets[client_id]
BUDGET_DEVICE = "reported by the device"  # lower than both: its node-config max-epsilon (unverifiable)

ROUND_KEYS = (
    "round",
    "accuracy",
    "loss",
    "clients_trained",
    "clients_declined",
    "clients_rejected",
    "clients_failed",
)

EPSILON_PLOT = "plots/epsilon_per_round.png"
ACCURACY_PLOT = "plots/accuracy_per_round.png"


# --------------------------------------------------------------------------- build


def build_report(
    *,
    config: dict,
    clients_reported: dict,
    rounds: list[dict],
    client_level: dict | None = None,
) -> dict:
    """The schema-v1 report dict of DESIGN.md.

    ``config`` is the resolved config; ``clients_reported`` the parsed
    ``clients_reported.json`` (``{"run_id": ..., "clients": {id: entry}}``); ``rounds``
    the rows of ``metrics.jsonl``; ``client_level`` the server's client-level block,
    used as is (the disabled block when ``None``).

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
        raise ConfigError(
            "privacy.sample.accountant", f"{accountant!r} is not one of {sorted(ACCOUNTANTS)}"
        )
    entries = _sorted_entries((clients_reported.get("clients") or {}).items())
    derived = [_client_row(cid, entry, delta, accountant, sample_cfg) for cid, entry in entries] if sample_on else []
    clients = [row for row, _ in derived]

    level = client_level if client_level is not None else _disabled_client_level()
    report = {
        "schema_version": SCHEMA_VERSION,
        "fedpriv_version": __version__,
        "config": config,
        "sample_level": {
            "enabled": sample_on,
            "unit": SAMPLE_UNIT,
            "accountant": accountant,
            "delta": delta,
            "clients": clients,
        },
        "client_level": level,
        "secure_aggregation": bool(config["secagg"]),
        "rounds": [
            {key: row.get(key) for key in ROUND_KEYS}
            for row in sorted(rounds, key=lambda r: r["round"])
        ],
    }
    reported = [entry for _, entry in entries] if sample_on else []
    dropped = [left_out for _, left_out in derived]
    report["caveats"] = _caveats(report, mode, reported, clients_reported.get("unreported") or {}, dropped)
    return report


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


def _sorted_entries(items: Iterable[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Numeric ids in numeric order (2 before 10), then any other ids alphabetically."""

    return sorted(items, key=lambda item: _id_order(str(item[1].get("client_id", item[0]))))


def _id_order(client_id: str) -> tuple[int, int, str]:
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def _client_row(
    key: str, entry: dict, delta: float, accountant: str, sample_cfg: dict
) -> tuple[dict, list]:
    """(one client's row, rounds whose ε could not be derived): ε, per-round ε and budget
    are derived here, never copied from ``entry``."""
    history = [list(h) for h in entry.get("history") or []]
    last = history[-1] if history else None
    client_id = str(entry.get("client_id", key))
    budget, source = _budget(client_id, entry, sample_cfg)
    spent = epsilon(history, delta, accountant)
    per_round, dropped = _per_round(history, entry, delta, accountant, spent)
    return {
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
    }, dropped


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


def _per_round(history: list, entry: dict, delta: float, accountant: str,
               spent: float | None = None) -> tuple[list[dict], list]:
    """(per-round ε recomputed from the history prefix at each round's steps, rounds left out).

    A round is left out when its entry gives no integer round or no usable cumulative step
    count (absent, not an integer, decreasing, or more than the history holds): its ε cannot be derived, and
    the client's own number is never copied.
    """
    out, dropped, floor = [], [], 0
    total = sum(int(h[2]) for h in history)
    known: dict[int, float] = {} if spent is None else {total: spent}  # PRV costs ~0.6 s an ε
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
        except (TypeError, ValueError, OverflowError):
            dropped.append(rnd)
            continue
        floor = steps
        if steps not in known:
            known[steps] = epsilon(prefix, delta, accountant)
        out.append({"round": rnd, "epsilon": known[steps], "steps": steps})
    return out, dropped


def _caveats(report: dict, mode: str, reported: list[dict], unreported: dict,
             dropped: list[list] | None = None) -> list[str]:
    """Plain sentences about what the ε does not cover or what the run revealed.

    ``reported`` holds the clients' own entries, in the order of the report's clients;
    ``unreported`` maps a client id to the rounds whose reply never reached the server;
    ``dropped`` the rounds of each client whose per-round ε could not be derived.
    """
    caveats = [
        CAVEAT_EVAL_METRICS,
        CAVEAT_NO_CSPRNG,
        CAVEAT_RELEASED_TO_SERVER,
        CAVEAT_NEIGHBOURS,
    ]
    if mode in ("sample", "both"):
        caveats.append(_caveat_sample_rate(report["config"]))
    recipe = report["config"].get("recipe") or {}
    if recipe.get("prototypes"):
        caveats.append(
            "Round 1 released DP class prototypes (recipe.prototypes): each client sent its per-class "
            "sums of unit-norm pooled features, for all classes and with no per-class counts. "
            + ("Every entry carried N(0, σ_p²) noise at sensitivity 1 (one example moves one class's sum "
               "by norm at most 1); the release is one (σ_p, q = 1, 1 step) entry of each client's history, "
               "and its ε is included above. " if mode in ("sample", "both") else
               "Without sample-level DP these sums carry no per-example noise. ")
            + "The server turned their sum into the head's starting weights (post-processing)."
        )
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
        caveats.append(
            "Secure aggregation is off: the server sees each client's individual update."
        )

    sample = report["sample_level"]
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
            caveats.append(
                f"Client {cid} has spent ε = {row['epsilon']:.4f}, more than its budget "
                f"{float(budget):g}."
            )
    for cid, rounds in sorted(unreported.items(), key=lambda kv: _id_order(kv[0])):
        caveats.append(
            f"Client {cid}'s reply for round(s) {', '.join(map(str, rounds))} never reached the "
            "server (timeout or failure). If it trained anyway, it spent more than this report "
            "shows; the ledger on the client is authoritative and its next report includes it."
        )
    return caveats


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


# --------------------------------------------------------------------------- write


def write_report(run_dir: Path, report: dict) -> None:
    """Write the JSON, Markdown and HTML reports and the two plots into ``run_dir``.

    Every file is replaced atomically so a reader (or a crash) never sees a half
    written report; the plots are written first so the HTML never links to a
    missing image.
    """
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / EPSILON_PLOT, _epsilon_plot(report))
    atomic_write_bytes(run_dir / ACCURACY_PLOT, _accuracy_plot(report))
    blocks = _document(report)
    json_text = json.dumps(report, indent=2) + "\n"
    atomic_write_bytes(run_dir / "privacy_report.json", json_text.encode())
    atomic_write_bytes(run_dir / "privacy_report.md", _to_markdown(blocks).encode())
    atomic_write_bytes(run_dir / "privacy_report.html", _to_html(blocks).encode())


def render_run_dir(run_dir: Path) -> dict:
    """``fedpriv report RUN_DIR``: rebuild the report from the run's files and write it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    config_path = _required(run_dir / ".hydra" / "config.yaml")
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    rounds = _read_metrics(_required(run_dir / "metrics.jsonl"))
    clients_reported = json.loads(_required(run_dir / "clients_reported.json").read_text())
    level_path = run_dir / "client_level.json"
    client_level = json.loads(level_path.read_text()) if level_path.exists() else None
    report = build_report(
        config=config,
        clients_reported=clients_reported,
        rounds=rounds,
        client_level=client_level,
    )
    write_report(run_dir, report)
    return report


def _required(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a complete fedpriv run directory")
    return path


def _read_metrics(path: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``.

    A last line without its newline is a round whose append was cut short by a crash:
    that round never completed, so it is skipped if it does not parse. Any other bad
    line is corruption and raises.
    """
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path} line {number}: not valid JSON ({err})") from err
    return rows


# --------------------------------------------------------------------------- plots


def _epsilon_plot(report: dict) -> bytes:
    """Cumulative sample-level ε per round for each client, budgets, client-level ε."""
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    sample = report["sample_level"]
    clients = sample["clients"]
    level = report["client_level"]
    drawn = False
    for row in clients:
        points = [(p["round"], p["epsilon"]) for p in row["per_round"]]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"client {row['client_id']}")
            drawn = True
    budgets = {float(r["budget_epsilon"]) for r in clients if r["budget_epsilon"] is not None}
    for budget in sorted(budgets):
        ax.axhline(budget, color="red", linestyle="--", linewidth=1,
                   label=f"budget ε = {budget:g}")
        drawn = True
    client_points = [(p["round"], p["epsilon"]) for p in level.get("per_round") or []]
    if level.get("enabled") and client_points:
        xs, ys = zip(*client_points)
        ax.plot(xs, ys, color="black", linewidth=2.5, marker="s", label="client-level ε")
        drawn = True

    if drawn:
        if len(clients) <= 12:  # beyond that the legend hides the lines
            ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no differential privacy in this run", ha="center",
                va="center", transform=ax.transAxes)
    title = "Cumulative ε per round"
    if sample["enabled"]:
        title += f" (sample level: δ = {sample['delta']:g}, {sample['accountant']})"
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel("ε")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _accuracy_plot(report: dict) -> bytes:
    """Global evaluation accuracy and loss per round (twin y axes: different scales)."""
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    rounds = report["rounds"]
    accuracy = [(r["round"], r["accuracy"]) for r in rounds if r["accuracy"] is not None]
    loss = [(r["round"], r["loss"]) for r in rounds if r["loss"] is not None]
    if accuracy:
        ax.plot(*zip(*accuracy), color="tab:blue", marker="o", label="accuracy")
    ax.set_ylabel("accuracy", color="tab:blue")
    loss_ax = ax.twinx()
    if loss:
        loss_ax.plot(*zip(*loss), color="tab:orange", marker="s", label="loss")
    loss_ax.set_ylabel("loss", color="tab:orange")
    if not accuracy and not loss:
        ax.text(0.5, 0.5, "no completed rounds", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("Evaluation per round (released without DP noise)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- document
# Blocks: ("h1"|"h2"|"p", text) · ("ul", [text]) · ("table", headers, rows) ·
# ("code", text) · ("img", alt, src). All text is plain; renderers escape it.

Block = tuple[Any, ...]

MODE_WORDS = {
    "none": "none (no differential privacy)",
    "sample": "sample (sample-level DP-SGD on each client)",
    "client": "client (client-level DP on the aggregate)",
    "both": "both (sample-level and client-level DP)",
}


def _document(report: dict) -> list[Block]:
    sample = report["sample_level"]
    return [
        ("h1", "fedpriv privacy report"),
        ("h2", "Summary"),
        ("ul", _summary(report)),
        ("h2", "The two privacy levels side by side"),
        _levels_table(report),
        ("h2", "Clients (sample level)"),
        *([_client_table(sample),
           ("p", "Each client's accountant history: every (σ, q, steps) entry, in order "
                 "(ε is recomputed from all of them)."),
           _history_table(sample)]
          if sample["enabled"]
          else [("p", "Sample-level DP was off in this run: no per-client ε.")]),
        ("img", "cumulative ε per round", EPSILON_PLOT),
        ("h2", "Rounds"),
        _round_table(report),
        ("img", "accuracy and loss per round", ACCURACY_PLOT),
        ("h2", "What the two privacy levels protect"),
        *_levels_explained(report),
        ("h2", "Recomputing ε from privacy_report.json"),
        *_recompute(sample),
        *_recompute_client_level(report["client_level"]),
        ("h2", "Caveats"),
        ("ul", list(report["caveats"])),
        ("h2", "Configuration"),
        ("code", json.dumps(report["config"], indent=2)),
        ("p", f"fedpriv {report['fedpriv_version']}, report schema {report['schema_version']}."),
    ]


def _summary(report: dict) -> list[str]:
    config = report["config"]
    mode = config["privacy"]["mode"]
    sample = report["sample_level"]
    level = report["client_level"]
    lines = [f"Privacy mode: {MODE_WORDS[mode]}."]
    if mode == "none":
        lines.append("No formal privacy guarantee holds for this run.")
    if sample["enabled"]:
        budget = config["privacy"]["sample"].get("epsilon")
        lines.append(
            f"Sample level: δ = {sample['delta']:g}, accountant {sample['accountant']}, "
            f"run budget ε = {_g(budget)} (privacy.sample.epsilon)."
        )
        clients = sample["clients"]
        if clients:
            top = max(clients, key=lambda r: r["epsilon"])
            lines.append(
                f"Highest client ε: {top['epsilon']:.4f} (client {top['client_id']}) "
                f"against its budget {_g(top['budget_epsilon'])}."
            )
        exhausted = sum(r["exhausted"] for r in clients)
        lines.append(f"Clients that exhausted their budget: {exhausted} of {len(clients)}.")
    if level.get("enabled"):
        lines.append(
            f"Client level: ε = {_f4(level.get('epsilon'))}, δ = {_g(level.get('delta'))}, "
            f"σ = {_g(level.get('noise_multiplier'))}, "
            f"clipping norm = {_g(level.get('clipping_norm'))}."
        )
        if level.get("stopped"):
            lines.append(f"The run stopped early: {level['stopped']['reason']}.")
    else:
        lines.append("Client level: off.")
    lines.append(
        "Secure aggregation: on (the server sees only the sum of updates)."
        if report["secure_aggregation"]
        else "Secure aggregation: off (the server sees each client's update)."
    )
    rounds = report["rounds"]
    if rounds:
        last = rounds[-1]
        lines.append(
            f"Rounds completed: {len(rounds)}; last round {last['round']}: accuracy "
            f"{_f4(last['accuracy'])}, loss {_f4(last['loss'])}."
        )
    else:
        lines.append("Rounds completed: 0.")
    return lines


def _levels_table(report: dict) -> Block:
    """Sample level and client level in two columns, each with its unit in plain words."""
    sample, level = report["sample_level"], report["client_level"]
    clients = sample["clients"]
    top = max((r["epsilon"] for r in clients), default=None)
    on = {True: "on", False: "off"}
    rows = [
        ["enabled", on[bool(sample["enabled"])], on[bool(level.get("enabled"))]],
        ["unit protected", f"{SAMPLE_UNIT} (adding or removing a single training example)",
         f"{CLIENT_UNIT} (adding or removing a client's entire data set)"],
        ["ε spent", f"{_f4(top)} (highest client)" if sample["enabled"] else "—",
         _f4(level.get("epsilon")) if level.get("enabled") else "—"],
        ["ε budget", _g(report["config"]["privacy"]["sample"].get("epsilon")) if sample["enabled"] else "—",
         _g(level.get("budget_epsilon")) if level.get("enabled") else "—"],
        ["δ", _g(sample["delta"]), _g(level.get("delta"))],
        ["noise multiplier σ", ", ".join(sorted({_g(h[0]) for r in clients for h in r["history"]}
                                                | {_g(r["noise_multiplier"]) for r in clients
                                                   if not r["history"] and r["noise_multiplier"] is not None}))
         or "—",
         _g(level.get("noise_multiplier"))],
        ["clipping norm", ", ".join(sorted({_g(r["max_grad_norm"]) for r in clients})) or "—",
         _g(level.get("clipping_norm"))],
        ["where noise is added", "on each client, every DP-SGD step" if sample["enabled"] else "—",
         "on the server, to the sum of clipped client updates" if level.get("enabled") else "—"],
        ["accountant", str(sample["accountant"] or "—"),
         f"{level.get('accountant', 'rdp')}, q = 1 (no amplification)" if level.get("enabled") else "—"],
    ]
    return ("table", ["", "sample level", "client level"], rows)


def _client_table(sample: dict) -> Block:
    headers = ["client", "ε spent", "budget", "budget from", "rounds trained", "rounds declined",
               "C", "steps", "exhausted"]
    rows = [
        [
            r["client_id"],
            _f4(r["epsilon"]),
            _g(r["budget_epsilon"]),
            str(r.get("budget_source", "—")),
            str(r["rounds_participated"]),
            str(r["rounds_declined"]),
            _g(r["max_grad_norm"]),
            str(r["steps"]),
            "yes" if r["exhausted"] else "no",
        ]
        for r in sample["clients"]
    ]
    return ("table", headers, rows)


def _history_table(sample: dict) -> Block:
    """Every (σ, q, steps) entry of every client's history: a ledger may span several runs."""
    rows = [
        [r["client_id"], str(i), _g(h[0]), _g(h[1]), str(int(h[2]))]
        for r in sample["clients"]
        for i, h in enumerate(r["history"], start=1)
    ]
    return ("table", ["client", "entry", "σ", "q", "steps"], rows)


def _round_table(report: dict) -> Block:
    level = report["client_level"]
    show_client_eps = bool(level.get("enabled"))
    client_eps = {p["round"]: p["epsilon"] for p in level.get("per_round") or []}
    headers = ["round", "accuracy", "loss", "trained", "declined", "rejected", "failed"]
    if show_client_eps:
        headers.append("client-level ε")
    rows = []
    for r in report["rounds"]:
        row = [
            str(r["round"]),
            _f4(r["accuracy"]),
            _f4(r["loss"]),
            *(_count(r[k]) for k in ROUND_KEYS[3:]),
        ]
        if show_client_eps:
            row.append(_f4(client_eps.get(r["round"])))
        rows.append(row)
    return ("table", headers, rows)


def _levels_explained(report: dict) -> list[Block]:
    level = report["client_level"]
    blocks: list[Block] = [
        ("p",
         f"Sample level — the unit protected is {SAMPLE_UNIT}. A client's ε bounds how "
         "much adding or removing any single training example of that client can change "
         "everything the client released (its updates, and so the final model). Each "
         "client has its own ε, cumulative over every round it trained in, including "
         "earlier runs that shared its ledger; it never goes down."),
        ("p",
         f"Client level — the unit protected is {CLIENT_UNIT}. ε bounds how much adding "
         "or removing one client's entire data set can change the aggregated model. "
         "Noise is added to the sum of clipped updates, which is divided by the planned "
         "number of clients."),
        ("p",
         "Smaller ε means stronger protection. δ is the small probability with which the "
         "ε bound is allowed not to hold; it should be far below 1/n."),
    ]
    if level.get("assumptions"):
        blocks.append(("p", "Client-level assumptions:"))
        blocks.append(("ul", [str(a) for a in level["assumptions"]]))
    return blocks


def _recompute(sample: dict) -> list[Block]:
    if not sample["enabled"]:
        return [("p", "Sample-level DP was off in this run: there is no ε to recompute.")]
    cls = ACCOUNTANTS[sample["accountant"]].__name__
    return [
        ("p",
         "Every client's ε follows from its history alone. With client an entry of "
         "sample_level.clients and delta = sample_level.delta, Opacus gives exactly the "
         "client's epsilon field (unrounded):"),
        ("code",
         f"from opacus.accountants import {cls}\n"
         f"acc = {cls}(); acc.history = [tuple(h) for h in client[\"history\"]]\n"
         "acc.get_epsilon(delta)  # == client[\"epsilon\"]; an empty history is 0.0"),
    ]


def _recompute_client_level(level: dict) -> list[Block]:
    if not level.get("enabled") or "history" not in level:
        return []
    return [
        ("p",
         "The client-level ε follows from client_level.history, one entry [σ, 1.0, rounds released] "
         "(q = 1: no amplification by client sampling), with delta = client_level.delta:"),
        ("code",
         "from opacus.accountants import RDPAccountant\n"
         "acc = RDPAccountant(); acc.history = [tuple(h) for h in level[\"history\"]]\n"
         "acc.get_epsilon(delta)  # == level[\"epsilon\"]; no history is 0.0"),
    ]


def _f4(value: float | None) -> str:
    """ε, accuracy and loss in tables: 4 decimals (the JSON keeps full precision)."""
    return "—" if value is None else f"{float(value):.4f}"


def _g(value: float | None) -> str:
    return "—" if value is None else f"{float(value):.4g}"


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


# --------------------------------------------------------------------------- renderers


def _to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, *args in blocks:
        if kind == "h1":
            out.append(f"# {args[0]}")
        elif kind == "h2":
            out.append(f"## {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            headers, rows = args
            lines = [_md_row(headers), "|" + "---|" * len(headers)]
            lines += [_md_row(row) for row in rows]
            out.append("\n".join(lines))
        elif kind == "code":
            fence = "`" * max(3, _longest_backtick_run(args[0]) + 1)
            out.append(f"{fence}\n{args[0]}\n{fence}")
        elif kind == "img":
            out.append(f"![{args[0]}]({args[1]})")
    return "\n\n".join(out) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.5; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; font-size: .85rem; }
img { max-width: 100%; margin: 1rem 0; }
"""


def _to_html(blocks: list[Block]) -> str:
    e = html.escape
    body: list[str] = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(args[0])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            headers, rows = args
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            rows_html = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
        elif kind == "code":
            body.append(f"<pre><code>{e(args[0])}</code></pre>")
        elif kind == "img":
            body.append(f'<img src="{e(args[1])}" alt="{e(args[0])}">')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>fedpriv privacy report</title>\n"
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
