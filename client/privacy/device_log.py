"""``fedpriv device-log STATE_DIR [--client ID] [--html FILE]``: the device owner's view.

Reads the transparency log(s) under a device's state directory
(``client/privacy/transparency.py``) and tells, in plain words, what left the device, when, and
what privacy it cost: a table per run and round, the totals (messages, bytes, privacy
spent, runs joined) and how the privacy spent grew. It reads only the device's own log;
nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections import OrderedDict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.privacy import transparency
from common.personal import read_evaluations

PLAIN_WORDS = (
    "This is what your device sent to the training server, and what it cost your privacy. "
    "Your texts, their labels and anything computed from a single one of them never left the "
    "device: only a model update (numbers averaged over all your examples, with noise added) did. "
    "'Privacy spent' (epsilon) adds up over every round and every run: lower is more private; "
    "your device refuses to train once it would go over its budget."
)
EVENT_WORDS = {
    transparency.SENT: "sent an update",
    transparency.DECLINED: "declined",
    transparency.RESENT: "sent the same update again (no new cost)",
    transparency.EVALUATED: "evaluated and personalised on the device",
}
EVALUATION_WORDS = (
    "How well the models do on the part of your data your device held out (never trained on): "
    "the global model everyone receives, and your personal model, which was trained on this "
    "device without privacy noise and never left it. These figures never left the device either."
)
EVALUATION_HEADERS = ["when (UTC)", "run", "round", "held-out examples", "global model", "personal model", "personal"]


def unprotected(lines: list[dict]) -> list[dict]:
    """The lines of updates that left with no noise added on the device (no ``protection``)."""
    return [
        line
        for line in lines
        if line["event"] in (transparency.SENT, transparency.RESENT) and not line.get("protection")
    ]


def summarise(lines: list[dict]) -> dict:
    """Totals over one client's log: messages, bytes, runs joined, privacy spent so far, and
    first the updates that left without protection (an ε elsewhere in the log says nothing
    about those)."""
    eps = [line for line in lines if line.get("epsilon_after") is not None]
    bare = unprotected(lines)
    return {
        "sent_without_protection": len(bare),
        "unprotected_rounds": [(line["run_id"], line["round"]) for line in bare],
        "messages": len(lines),
        "updates_sent": sum(line["event"] == transparency.SENT for line in lines),
        "declined": sum(line["event"] == transparency.DECLINED for line in lines),
        "resent": sum(line["event"] == transparency.RESENT for line in lines),
        "bytes": sum(int(line["bytes"]) for line in lines),
        "runs": list(OrderedDict.fromkeys(line["run_id"] for line in lines)),
        # ε never goes down: the latest is the largest; it is worth nothing without its δ.
        "epsilon": max(line["epsilon_after"] for line in eps) if eps else None,
        "delta": max(eps, key=lambda line: line["epsilon_after"]).get("delta") if eps else None,
    }


def _eps(value, delta=None) -> str:
    if value is None:
        return "none (no privacy protection)"
    return f"{value:.2f}" if delta is None else f"{value:.2f} at delta {delta:.3g}"


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _what(line: dict) -> str:
    if line["event"] == transparency.EVALUATED:
        return "only a yes/no flag (no weights, no figures)"
    if line["event"] == transparency.DECLINED:
        return (
            f"nothing (declined: {line['reason']})"
            if not line["masked"]
            else f"a masked vector of zeros (declined: {line['reason']})"
        )
    count = sum(1 for _ in line["tensors"])
    masked = ", masked so the server saw only the sum over devices" if line["masked"] else ""
    return f"{count} weight tensor(s){masked}"


def _noise(line: dict) -> str:
    p = line.get("protection")
    if not p:
        return "-"
    text = (
        f"{p['mechanism']}: noise {p['sigma']:.3g} x clip {p['clip_norm']:.3g}, q {p['sample_rate']:.3g}, "
        f"{p['steps']} step(s)"
    )
    share = line.get("noise_share")
    if share:  # distributed noise: this device added only its share; its own message's ε beside it
        text += (
            f"; this device's share 1/{share['n_min']} of the sum's noise; epsilon of this message alone "
            f"{_eps(line.get('epsilon_local'), line.get('delta'))}"
        )
    return text


def rows(lines: list[dict]) -> list[list[str]]:
    return [
        [
            line["time"],
            line["run_id"][:8],
            str(line["round"]),
            EVENT_WORDS[line["event"]],
            _what(line),
            _size(int(line["bytes"])),
            _noise(line),
            _eps(line["epsilon_before"], line.get("delta")),
            _eps(line["epsilon_after"], line.get("delta")),
        ]
        for line in lines
    ]


HEADERS = [
    "when (UTC)",
    "run",
    "round",
    "what happened",
    "what left the device",
    "size",
    "protection",
    "privacy spent before",
    "after",
]


def _accuracy(value) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


def evaluation_rows(evaluations: list[dict]) -> list[list[str]]:
    """The device's own evaluations (``common.personal``'s ``client_eval.jsonl``), one row each."""
    return [
        [
            str(e.get("time", "")),
            str(e.get("run_id", ""))[:8],
            f"{e.get('round')}{' (last)' if e.get('final') else ''}",
            str(e.get("test_examples", "-")),
            _accuracy(e.get("global_accuracy")),
            _accuracy(e.get("personal_accuracy")),
            str(e.get("personalize", "none")),
        ]
        for e in evaluations
    ]


def epsilon_curve_png(lines: list[dict]) -> bytes | None:
    points = [line["epsilon_after"] for line in lines if line.get("epsilon_after") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.plot(range(1, len(points) + 1), points, marker="o")
    ax.set_xlabel("message (in order)")
    ax.set_ylabel("privacy spent (epsilon)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def to_html(logs: dict[str, list[dict]], evaluations: dict[str, list[dict]] | None = None) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>What left this device</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .5em;font-size:.9em}</style></head><body>",
        "<h1>What left this device</h1>",
        f"<p>{esc(PLAIN_WORDS)}</p>",
    ]
    for client_id, lines in logs.items():
        total = summarise(lines)
        parts.append(f"<h2>Client {esc(client_id)}</h2>")
        if (warning := _unprotected_sentence(total)) is not None:
            parts.append(f"<p><strong>{esc(warning)}</strong></p>")
        parts.append(f"<p>{esc(_totals_sentence(total))}</p>")
        for run_id in total["runs"]:
            run_lines = [line for line in lines if line["run_id"] == run_id]
            parts.append(
                f"<h3>Run {esc(run_id)}</h3><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADERS) + "</tr>"
            )
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows(run_lines)]
            parts.append("</table>")
        png = epsilon_curve_png(lines)
        if png is not None:
            parts.append(
                "<h3>How the privacy spent grew</h3><img alt='privacy spent per message' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            )
        kept = (evaluations or {}).get(client_id) or []
        if kept:
            parts.append(
                f"<h3>On this device only: your data's held-out part</h3><p>{esc(EVALUATION_WORDS)}</p><table><tr>"
            )
            parts.append("".join(f"<th>{esc(h)}</th>" for h in EVALUATION_HEADERS) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in evaluation_rows(kept)]
            parts.append("</table>")
        parts.append(f"<p>Never sent: {esc(', '.join(transparency.NEVER_SENT))}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _unprotected_sentence(total: dict) -> str | None:
    """The first thing an owner reads when any update left without the device's own noise."""
    if not total["sent_without_protection"]:
        return None
    where = ", ".join(f"run {run[:8]} round {rnd}" for run, rnd in total["unprotected_rounds"])
    return (
        f"WARNING: {total['sent_without_protection']} update(s) sent without protection (no noise added on "
        f"this device; the privacy spent below does not cover them): {where}."
    )


def _totals_sentence(total: dict) -> str:
    return (
        f"{total['messages']} message(s) in {len(total['runs'])} run(s): {total['updates_sent']} update(s) "
        f"sent, {total['resent']} resent, {total['declined']} declined; {_size(total['bytes'])} in all; "
        f"privacy spent so far: {_eps(total['epsilon'], total['delta'])}."
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedpriv device-log", description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path, help="the device's state directory (its state-dir node config)")
    parser.add_argument("--client", help="one client id (default: every client with a log there)")
    parser.add_argument("--html", type=Path, help="also write the view as an HTML page")
    args = parser.parse_args(argv)
    ids = [args.client] if args.client else transparency.clients(args.state_dir)
    logs = {cid: transparency.read(args.state_dir, cid) for cid in ids}
    evaluations = {cid: read_evaluations(args.state_dir, cid) for cid in ids}
    if not any(logs.values()):
        print(
            f"fedpriv device-log: no transparency log under {args.state_dir}"
            f"{' for client ' + args.client if args.client else ''}: nothing has left this device"
        )
        return 1
    console = Console()
    console.print(PLAIN_WORDS)
    for client_id, lines in logs.items():
        console.rule(f"client {client_id}")
        total = summarise(lines)
        if (warning := _unprotected_sentence(total)) is not None:
            console.print(f"[bold red]{warning}[/]", soft_wrap=True)
        for run_id in total["runs"]:
            table = Table(*HEADERS, title=f"run {run_id}", show_lines=False)
            for row in rows([line for line in lines if line["run_id"] == run_id]):
                table.add_row(*row)
            console.print(table)
        console.print(_totals_sentence(total))
        if evaluations[client_id]:
            console.print(EVALUATION_WORDS)
            table = Table(*EVALUATION_HEADERS, title="on this device only: accuracy on its held-out part")
            for row in evaluation_rows(evaluations[client_id]):
                table.add_row(*row)
            console.print(table)
    if args.html:
        args.html.write_text(to_html(logs, evaluations), encoding="utf-8")
        console.print(f"fedpriv device-log: page written to {args.html}")
    return 0
