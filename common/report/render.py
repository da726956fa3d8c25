"""Rendering the report for people and scripts: the five files of the run directory.

Three renderings of one report dict (schema_version 1 of DESIGN.md):

* ``privacy_report.json`` — full precision, for scripts;
* ``privacy_report.md`` and ``privacy_report.html`` — for a privacy officer: summary
  first, then tables, the meaning of the two privacy levels, how to recompute ε, and
  the caveats. Both come from one list of neutral blocks (:func:`document`) so that
  they cannot drift apart; the HTML escapes every string because client ids and config
  values are untrusted input;
* ``plots/epsilon_per_round.png``, ``plots/accuracy_per_round.png`` and, when the
  report has an ``evaluation`` block, ``plots/confusion_matrix.png``
  (:mod:`common.report.plots`).

Nothing here computes a number of the report: every figure shown is formatted from the
dict that :mod:`common.report.build` made.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from common.privacy.accounting import ACCOUNTANTS
from common.privacy.units import CLIENT_UNIT
from common.report.plots import (
    ACCURACY_PLOT,
    CONFUSION_PLOT,
    EPSILON_PLOT,
    PER_CLIENT_PLOT,
    accuracy_plot,
    confusion_plot,
    epsilon_plot,
    per_client_plot,
)
from common.rundir import RunDir
from common.storage import atomic_write_bytes


def write_report(run_dir: Path, report: dict) -> None:
    """Write the JSON, Markdown and HTML reports and the plots into ``run_dir``.

    Every file is replaced atomically so a reader (or a crash) never sees a half
    written report; the plots are written first so the HTML never links to a
    missing image.
    """
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / EPSILON_PLOT, epsilon_plot(report))
    atomic_write_bytes(run_dir / ACCURACY_PLOT, accuracy_plot(report))
    if report.get("evaluation") is not None and "per_class" in report["evaluation"]:
        atomic_write_bytes(run_dir / CONFUSION_PLOT, confusion_plot(report))
    else:  # a plot left by an earlier rendering would show what this report does not
        (run_dir / CONFUSION_PLOT).unlink(missing_ok=True)
    if _has_per_client(report):
        atomic_write_bytes(run_dir / PER_CLIENT_PLOT, per_client_plot(report))
    else:
        (run_dir / PER_CLIENT_PLOT).unlink(missing_ok=True)
    blocks = document(report)
    json_text = json.dumps(report, indent=2) + "\n"
    run = RunDir(run_dir)
    atomic_write_bytes(run.report_json, json_text.encode())
    atomic_write_bytes(run.report_md, to_markdown(blocks).encode())
    atomic_write_bytes(run.report_html, to_html(blocks).encode())


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


def document(report: dict) -> list[Block]:
    sample = report["sample_level"]
    return [
        ("h1", "fedpriv privacy report"),
        ("h2", "Summary"),
        ("ul", _summary(report)),
        ("h2", "The two privacy levels side by side"),
        _levels_table(report),
        ("h2", "Clients (sample level)"),
        *(
            [
                _client_table(sample),
                (
                    "p",
                    "Each client's accountant history: every (σ, q, steps) entry, in order "
                    "(ε is recomputed from all of them).",
                ),
                _history_table(sample),
            ]
            if sample["enabled"]
            else [("p", "Sample-level DP was off in this run: no per-client ε.")]
        ),
        ("img", "cumulative ε per round", EPSILON_PLOT),
        ("h2", "Rounds"),
        _round_table(report),
        ("img", "accuracy and loss per round", ACCURACY_PLOT),
        ("h2", "Evaluation of the final model"),
        *_evaluation(report.get("evaluation")),
        *_per_client(report.get("evaluation"), report["config"]),
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
        dist = sample.get("distributed")
        if dist is not None:
            local = max((r.get("epsilon_local") or 0.0 for r in clients), default=0.0)
            lines.append(
                f"Distributed noise ({dist['mechanism']}, n_min = {dist['n_min']}): each ε above is against the "
                "server and everyone who receives the model, and trusts SecAgg+ and at least n_min honest "
                f"noise shares in every sum. Trusting no one (a client's own message alone), the highest "
                f"ε is {local:.4f} (epsilon_local)."
            )
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
        f1 = f", entity micro F1 {_f4(last['micro_f1'])}" if last.get("micro_f1") is not None else ""
        f1 += f", macro F1 {_f4(last['macro_f1'])}" if last.get("macro_f1") is not None else ""
        lines.append(
            f"Rounds completed: {len(rounds)}; last round {last['round']}: accuracy "
            f"{_f4(last['accuracy'])}, loss {_f4(last['loss'])}{f1}."
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
        [
            "unit protected",
            f"{sample['unit']} (adding or removing a single training example)",
            f"{CLIENT_UNIT} (adding or removing a client's entire data set)",
        ],
        [
            "ε spent",
            f"{_f4(top)} (highest client)" if sample["enabled"] else "—",
            _f4(level.get("epsilon")) if level.get("enabled") else "—",
        ],
        [
            "ε budget",
            _g(report["config"]["privacy"]["sample"].get("epsilon")) if sample["enabled"] else "—",
            _g(level.get("budget_epsilon")) if level.get("enabled") else "—",
        ],
        ["δ", _g(sample["delta"]), _g(level.get("delta"))],
        [
            "noise multiplier σ",
            ", ".join(
                sorted(
                    {_g(h[0]) for r in clients for h in r["history"]}
                    | {
                        _g(r["noise_multiplier"])
                        for r in clients
                        if not r["history"] and r["noise_multiplier"] is not None
                    }
                )
            )
            or "—",
            _g(level.get("noise_multiplier")),
        ],
        [
            "clipping norm",
            ", ".join(sorted({_g(r["max_grad_norm"]) for r in clients})) or "—",
            _g(level.get("clipping_norm")),
        ],
        [
            "where noise is added",
            "on each client, every DP-SGD step" if sample["enabled"] else "—",
            "on the server, to the sum of clipped client updates" if level.get("enabled") else "—",
        ],
        [
            "accountant",
            str(sample["accountant"] or "—"),
            f"{level.get('accountant', 'rdp')}, q = 1 (no amplification)" if level.get("enabled") else "—",
        ],
    ]
    return ("table", ["", "sample level", "client level"], rows)


def _client_table(sample: dict) -> Block:
    if sample.get("distributed") is not None:
        headers, rows = _client_table_plain(sample)
        headers.insert(2, "ε of its own message (epsilon_local)")
        for row, r in zip(rows, sample["clients"], strict=True):
            row.insert(2, _f4(r.get("epsilon_local")))
        return ("table", headers, rows)
    headers, rows = _client_table_plain(sample)
    return ("table", headers, rows)


def _client_table_plain(sample: dict) -> tuple[list[str], list[list[str]]]:
    headers = [
        "client",
        "ε spent",
        "budget",
        "budget from",
        "rounds trained",
        "rounds declined",
        "C",
        "steps",
        "exhausted",
    ]
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
    return headers, rows


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
    tokens = any(r.get("micro_f1") is not None for r in report["rounds"])
    headers = [
        "round",
        "accuracy",
        "loss",
        *(["micro F1"] if tokens else []),
        "macro F1",
        "weighted F1",
        "trained",
        "declined",
        "rejected",
        "failed",
    ]
    if show_client_eps:
        headers.append("client-level ε")
    rows = []
    for r in report["rounds"]:
        row = [
            str(r["round"]),
            _f4(r["accuracy"]),
            _f4(r["loss"]),
            *([_f4(r.get("micro_f1"))] if tokens else []),
            _f4(r.get("macro_f1")),
            _f4(r.get("weighted_f1")),
            *(_count(r[k]) for k in ("clients_trained", "clients_declined", "clients_rejected", "clients_failed")),
        ]
        if show_client_eps:
            row.append(_f4(client_eps.get(r["round"])))
        rows.append(row)
    return ("table", headers, rows)


def _evaluation(evaluation: dict | None) -> list[Block]:
    """The final model's per-class table and confusion plot, or why there are none."""
    if evaluation is None:
        return [
            (
                "p",
                "This run directory holds no per-class evaluation (evaluation.json): it was "
                "written before fedpriv recorded one, or completed no round.",
            )
        ]
    if "per_entity" in evaluation:
        return _entity_evaluation(evaluation)
    per_class = evaluation["per_class"]
    rows = [
        [name, *(_f4(per_class[name][k]) for k in ("precision", "recall", "f1")), str(per_class[name]["support"])]
        for name in evaluation["labels"]
    ]
    return [
        (
            "p",
            f"The model after round {evaluation['round']}, on the server's held-out test set "
            f"({evaluation['num_examples']} examples): accuracy {_f4(evaluation['accuracy'])}, loss "
            f"{_f4(evaluation['loss'])}, macro F1 {_f4(evaluation['macro_f1'])}, weighted F1 "
            f"{_f4(evaluation['weighted_f1'])}. Released without DP noise (see the caveats).",
        ),
        (
            "p",
            "Per class, from scikit-learn's precision_recall_fscore_support over every label of the run. "
            "With zero_division=0, a class never predicted has precision 0 and a class absent from the "
            "test set recall 0 (and F1 0). Macro F1 is the plain mean of the F1 column, weighted F1 its "
            "mean weighted by support.",
        ),
        ("table", ["class", "precision", "recall", "F1", "support"], rows),
        ("img", "confusion matrix of the final model", CONFUSION_PLOT),
        (
            "p",
            "What the final model attends to: explain_test_set.html in this directory shows its attention "
            "maps and token shading on a few of these test inputs (evaluation.explain_inputs of them; none "
            'when 0); `fedpriv explain RUN_DIR --text "..."` does the same for any text. Both read only '
            "the released model.",
        ),
    ]


def _has_per_client(report: dict) -> bool:
    evaluation = report.get("evaluation") or {}
    return any(r.get("global_accuracy") is not None for r in evaluation.get("per_client") or [])


def per_client_lines(evaluation: dict) -> list[str]:
    """The per-client summary in words (the report and the terminal): mean, 10th percentile and
    worst client of the global and of the personal models, beside the global test accuracy."""
    summary = evaluation.get("per_client_summary") or {}
    out = []
    for name, key in (("global model", "global"), ("personal models", "personal")):
        stats = summary.get(key)
        if stats:
            out.append(
                f"{name}: mean {_f4(stats['mean'])}, 10th percentile {_f4(stats['p10'])}, worst client "
                f"{_f4(stats['worst'])} (over {summary['clients']} clients' own held-out data)"
            )
    out.append(f"global model on the server's test set: {_f4(evaluation.get('accuracy'))}")
    return out


def _per_client(evaluation: dict | None, config: dict) -> list[Block]:
    """Each client's accuracy on its own held-out part (``evaluation.per_client``), when the run asked."""
    if evaluation is None or "per_client" not in evaluation:
        return []
    blocks: list[Block] = [("h2", "Per client: the global and the personal models on each client's own data")]
    blocks.append(("p", str(evaluation.get("per_client_source") or "")))
    if not evaluation["per_client"]:
        return blocks
    blocks.append(("ul", per_client_lines(evaluation)))
    rows = [
        [
            str(r["client_id"]),
            _count(r.get("test_examples")),
            _f4(r.get("global_accuracy")),
            _f4(r.get("personal_accuracy")),
        ]
        for r in evaluation["per_client"]
    ]
    blocks.append(("table", ["client", "held-out examples", "global model", "personal model"], rows))
    if any(r.get("global_accuracy") is not None for r in evaluation["per_client"]):
        blocks.append(("img", "each client's accuracy: global vs personal model", PER_CLIENT_PLOT))
    personal = (config.get("personalize") or {}).get("name", "none")
    if personal != "none":
        blocks.append(
            (
                "p",
                f"The personal models (personalize={personal}) were trained on each device without DP and never "
                "left it: they spend no ε (every ledger above is that of the same run without them) and are as "
                "private as the device they stay on.",
            )
        )
    return blocks


def _entity_evaluation(evaluation: dict) -> list[Block]:
    """Token classification: the final model's per-entity table (seqeval)."""
    per_entity = evaluation["per_entity"]
    rows = [
        [name, *(_f4(row[k]) for k in ("precision", "recall", "f1")), str(row["support"])]
        for name, row in per_entity.items()
    ]
    return [
        (
            "p",
            f"The model after round {evaluation['round']}, on the server's held-out test set "
            f"({evaluation['num_examples']} sentences): entity-level micro F1 {_f4(evaluation['micro_f1'])}, "
            f"macro F1 {_f4(evaluation['macro_f1'])}, weighted F1 {_f4(evaluation['weighted_f1'])}; word tag "
            f"accuracy {_f4(evaluation['accuracy'])}, loss {_f4(evaluation['loss'])}. Released without DP "
            "noise (see the caveats).",
        ),
        (
            "p",
            "Per entity type, from seqeval in its default (conlleval) mode: an entity counts as found only "
            "when its type and every word of its span match. Words that train.max_length cut off "
            f"({evaluation['words_cut']} in this test set) are scored as predicted O, so the scores cover "
            "every test word.",
        ),
        ("table", ["entity", "precision", "recall", "F1", "support"], rows),
    ]


def _levels_explained(report: dict) -> list[Block]:
    level = report["client_level"]
    blocks: list[Block] = [
        (
            "p",
            f"Sample level — the unit protected is {report['sample_level']['unit']}. A client's ε bounds how "
            "much adding or removing any single training example of that client can change "
            "everything the client released (its updates, and so the final model). Each "
            "client has its own ε, cumulative over every round it trained in, including "
            "earlier runs that shared its ledger; it never goes down.",
        ),
        (
            "p",
            f"Client level — the unit protected is {CLIENT_UNIT}. ε bounds how much adding "
            "or removing one client's entire data set can change the aggregated model. "
            "Noise is added to the sum of clipped updates, which is divided by the planned "
            "number of clients.",
        ),
        (
            "p",
            "Smaller ε means stronger protection. δ is the small probability with which the "
            "ε bound is allowed not to hold; it should be far below 1/n.",
        ),
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
        (
            "p",
            "Every client's ε follows from its history alone. With client an entry of "
            "sample_level.clients and delta = sample_level.delta, Opacus gives exactly the "
            "client's epsilon field (unrounded):",
        ),
        (
            "code",
            f"from opacus.accountants import {cls}\n"
            f'acc = {cls}(); acc.history = [tuple(h) for h in client["history"]]\n'
            'acc.get_epsilon(delta)  # == client["epsilon"]; an empty history is 0.0',
        ),
    ] + _recompute_distributed(sample)


def _recompute_distributed(sample: dict) -> list[Block]:
    if sample.get("distributed") is None:
        return []
    return [
        (
            "p",
            "With distributed noise the history's last len(client['discrete']) entries are the Gaussian "
            "equivalents of the Skellam releases: Opacus on them gives a lower bound. The reported ε composes "
            "the rest of the history with the releases, by the Skellam bound (Agarwal, Kairouz & Liu 2021, "
            "Theorem 3.5: α·l2²/(2μ) + min(((2α−1)·l2² + 6·l1)/(4μ²), 3·l1/(2μ)) per release, μ the sum's "
            "variance), subsampled by Zhu & Wang's general bound (2019, Theorem 6) when q < 1, summed at "
            "the integer orders of sample_level.distributed.orders and converted as Opacus converts; "
            "epsilon_local is the same with μ / n_min (one share):",
        ),
        (
            "code",
            "from common.privacy.accounting import spent_epsilon\n"
            "from common.privacy.discrete import SkellamEntry\n"
            'k = len(client["discrete"]); rel = [SkellamEntry.from_json(e) for e in client["discrete"]]\n'
            'spent_epsilon(client["history"][:len(client["history"]) - k], rel, delta, "rdp")  # == client["epsilon"]',
        ),
    ]


def _recompute_client_level(level: dict) -> list[Block]:
    if not level.get("enabled") or "history" not in level:
        return []
    return [
        (
            "p",
            "The client-level ε follows from client_level.history, one entry [σ, 1.0, rounds released] "
            "(q = 1: no amplification by client sampling), with delta = client_level.delta:",
        ),
        (
            "code",
            "from opacus.accountants import RDPAccountant\n"
            'acc = RDPAccountant(); acc.history = [tuple(h) for h in level["history"]]\n'
            'acc.get_epsilon(delta)  # == level["epsilon"]; no history is 0.0',
        ),
    ]


def _f4(value: float | None) -> str:
    """ε, accuracy and loss in tables: 4 decimals (the JSON keeps full precision)."""
    return "—" if value is None else f"{float(value):.4f}"


def _g(value: float | None) -> str:
    return "—" if value is None else f"{float(value):.4g}"


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


# --------------------------------------------------------------------------- Markdown, HTML


def to_markdown(blocks: list[Block]) -> str:
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


def to_html(blocks: list[Block]) -> str:
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
            rows_html = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
        elif kind == "code":
            body.append(f"<pre><code>{e(args[0])}</code></pre>")
        elif kind == "img":
            body.append(f'<img src="{e(args[1])}" alt="{e(args[0])}">')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>fedpriv privacy report</title>\n"
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
