"""The report's two figures, as PNG bytes: cumulative ε per round, accuracy and loss per round.

matplotlib is imported here only, and only inside the functions that draw: importing
it costs about a third of a second and tens of MB, and most processes that import
``common.report`` (a simulation actor, ``common.mechanism`` for a constant) never
draw a figure. Figures are drawn on an explicit Agg canvas, never through pyplot: no
display is needed, no process-wide backend is switched, and no global figure list
leaks memory.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Where the figures go in the run directory; the HTML report links to them.
EPSILON_PLOT = "plots/epsilon_per_round.png"
ACCURACY_PLOT = "plots/accuracy_per_round.png"


def epsilon_plot(report: dict) -> bytes:
    """Cumulative sample-level ε per round for each client, budgets, client-level ε."""
    fig = _figure()
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
    _integer_rounds(ax)
    return _png(fig)


def accuracy_plot(report: dict) -> bytes:
    """Global evaluation accuracy and loss per round (twin y axes: different scales)."""
    fig = _figure()
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
    _integer_rounds(ax)
    return _png(fig)


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, 4.5), dpi=100, layout="constrained")


def _integer_rounds(ax: Axes) -> None:
    """Rounds are whole numbers: no tick at round 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
