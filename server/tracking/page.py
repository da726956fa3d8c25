"""``fedpriv compare``'s page: one self-contained HTML file (figures inlined as base64 PNG).

The privacy–utility curve (each run's highest client ε against its final accuracy, one line
per value of the other settings that differ; a run without DP as a level line), every run's
accuracy per round overlaid, the table of the terminal, and a link to each run's report.
Figures are drawn on an explicit Agg canvas, as the report's are (``common.report.plots``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from urllib.parse import quote

from common.report import CAVEAT_EVAL_METRICS, HTML_STYLE
from server.tracking.runs import Comparison, Run

#: Settings that choose the ε itself: the curve's x axis, not a line of their own.
EPSILON_SETTINGS = (
    "privacy.sample.epsilon",
    "privacy.sample.client_budgets",
    "privacy.client.epsilon",
    "privacy.client.noise_multiplier",
)


def write_page(comparison: Comparison, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_html(comparison, out.parent))
    return out


def to_html(comparison: Comparison, where: Path) -> str:
    """The page, its links relative to ``where`` (the page's folder)."""
    e = html.escape
    runs = comparison.runs
    differs = ", ".join(comparison.keys) or "nothing in their configs"
    body = [
        f"<h1>fedpriv: {len(runs)} runs compared</h1>",
        f"<p>The runs differ in: <b>{e(differs)}</b>. Accuracy and macro F1 are the final model's on the "
        f"server's held-out test set ({e(CAVEAT_EVAL_METRICS)}); ε is the highest client's at the run's δ, "
        "as its privacy report states it.</p>",
        "<h2>Privacy and utility</h2>",
        _img(_points(comparison), utility_png(comparison)),
        "<h2>Accuracy per round</h2>",
        _img("accuracy per round of every run", rounds_png(comparison)),
        "<h2>The runs</h2>",
        _table(comparison, where),
    ]
    if comparison.skipped:
        body.append("<ul>" + "".join(f"<li>{e(note)}</li>" for note in comparison.skipped) + "</ul>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>fedpriv compare: {len(runs)} runs</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _table(comparison: Comparison, where: Path) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in [*comparison.headers(), "report"])
    rows = []
    for run, row in zip(comparison.runs, comparison.rows()):
        report = run.run_dir.report_html if run.run_dir.report_html.is_file() else run.run_dir.report_md
        href = quote(Path(os.path.relpath(report.resolve(), where.resolve())).as_posix())
        cells = "".join(f"<td>{e(cell)}</td>" for cell in row)
        rows.append(f'<tr>{cells}<td><a href="{e(href)}">{e(report.name)}</a></td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _points(comparison: Comparison) -> str:
    """The curve's points in words (the image's alternative text)."""
    said = [
        f"{run.label}: ε = {run.epsilon.value:.3g}, accuracy {run.last('accuracy'):.3f}"
        for run in comparison.runs
        if _plotted(run)
    ]
    return "highest client ε against final accuracy: " + ("; ".join(said) or "no run with differential privacy")


def _img(alt: str, png: bytes) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def lines(comparison: Comparison) -> dict[str, list[Run]]:
    """The curve's lines: runs grouped by their values of the differing settings other than ε's."""
    others = [key for key in comparison.keys if not key.startswith(EPSILON_SETTINGS)]
    groups: dict[str, list[Run]] = {}
    for run in comparison.runs:
        name = ", ".join(f"{key}={comparison.setting(run, key)}" for key in others) or "all runs"
        groups.setdefault(name, []).append(run)
    return groups


def utility_png(comparison: Comparison) -> bytes:
    """Highest client ε (x) against final accuracy (y): one line per group, no-DP runs as levels."""
    fig, ax = _figure()
    deltas = {run.epsilon.delta for run in comparison.runs if run.epsilon is not None}
    drawn = []
    for name, runs in lines(comparison).items():
        points = sorted((run.epsilon.value, run.last("accuracy")) for run in runs if _plotted(run))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
            for x, y in points:
                ax.annotate(f"ε={x:.2g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
            drawn += xs
        for run in runs:
            if run.epsilon is None and run.last("accuracy") is not None:
                ax.axhline(run.last("accuracy"), linestyle="--", color="grey", label=f"no DP: {name}")
    if drawn and max(drawn) / max(min(drawn), 1e-9) >= 10:
        ax.set_xscale("log")
    at = f"δ = {deltas.pop():g}" if len(deltas) == 1 else "at each run's δ"
    ax.set_xlabel(f"highest client ε ({at})")
    ax.set_ylabel("final accuracy")
    ax.set_title("Privacy–utility: one point per run")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    return _png(fig)


def _plotted(run: Run) -> bool:
    return run.epsilon is not None and run.last("accuracy") is not None


def rounds_png(comparison: Comparison) -> bytes:
    """Every run's accuracy per round (the report's ``rounds``), overlaid."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    for run in comparison.runs:
        points = [(r["round"], r["accuracy"]) for r in run.report.get("rounds") or [] if r.get("accuracy") is not None]
        if points:
            settings = ", ".join(f"{key}={comparison.setting(run, key)}" for key in comparison.keys)
            ax.plot(
                *zip(*points), marker="o", markersize=3, label=f"{run.label}: {settings}" if settings else run.label
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per round (released without DP noise)")
    if len(comparison.runs) <= 12 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    return _png(fig)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
