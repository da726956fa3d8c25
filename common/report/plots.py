"""The report's figures, as PNG bytes: cumulative ε per round, accuracy and loss per round,
and the final model's confusion matrix.

matplotlib is imported here only, and only inside the functions that draw: most
processes that import ``common.report`` (a simulation actor) never draw a figure, and
should not pay for its import (BENCHMARKS.md). Figures are drawn on an explicit Agg canvas, never through pyplot: no
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
CONFUSION_PLOT = "plots/confusion_matrix.png"
PER_CLIENT_PLOT = "plots/per_client_accuracy.png"

#: Up to this many classes the confusion plot is the full labelled grid; beyond it the
#: cells (and their names) are too small to read, so it shows the most-confused pairs.
MAX_GRID_CLASSES = 20
MOST_CONFUSED = 25  # pairs shown above MAX_GRID_CLASSES


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
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget ε = {budget:g}")
        drawn = True
    client_points = [(p["round"], p["epsilon"]) for p in level.get("per_round") or [] if p["epsilon"] is not None]
    if level.get("enabled") and client_points:
        xs, ys = zip(*client_points)
        ax.plot(xs, ys, color="black", linewidth=2.5, marker="s", label="client-level ε")
        drawn = True

    if drawn:
        if len(clients) <= 12:  # beyond that the legend hides the lines
            ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no differential privacy in this run", ha="center", va="center", transform=ax.transAxes)
    title = "Cumulative ε per round"
    if sample["enabled"]:
        title += f" (sample level: δ = {sample['delta']:g}, {sample['accountant']})"
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel("ε")
    ax.set_ylim(bottom=0)
    _integer_x_ticks(ax)
    return _png(fig)


def accuracy_plot(report: dict) -> bytes:
    """Global evaluation accuracy and loss per round (twin y axes: different scales)."""
    fig = _figure()
    ax = fig.add_subplot()
    rounds = report["rounds"]
    accuracy = [(r["round"], r["accuracy"]) for r in rounds if r["accuracy"] is not None]
    macro_f1 = [(r["round"], r["macro_f1"]) for r in rounds if r.get("macro_f1") is not None]
    micro_f1 = [(r["round"], r["micro_f1"]) for r in rounds if r.get("micro_f1") is not None]  # entities
    loss = [(r["round"], r["loss"]) for r in rounds if r["loss"] is not None]
    if accuracy:
        ax.plot(*zip(*accuracy), color="tab:blue", marker="o", label="accuracy")
    if macro_f1:  # same 0–1 scale as accuracy
        ax.plot(*zip(*macro_f1), color="tab:green", marker="^", linestyle="--", label="macro F1")
    if micro_f1:
        ax.plot(*zip(*micro_f1), color="tab:red", marker="v", linestyle="-.", label="entity micro F1")
    ax.set_ylabel("accuracy" + (", F1" if macro_f1 or micro_f1 else ""), color="tab:blue")
    loss_ax = ax.twinx()
    if loss:
        loss_ax.plot(*zip(*loss), color="tab:orange", marker="s", label="loss")
    loss_ax.set_ylabel("loss", color="tab:orange")
    if macro_f1 or micro_f1:  # lines share the left axis: say which is which, above every line
        handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
        loss_ax.legend(handles=handles, fontsize="small", loc="best")
    if not accuracy and not loss:
        ax.text(0.5, 0.5, "no completed rounds", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Evaluation per round (released without DP noise)")
    ax.set_xlabel("round")
    _integer_x_ticks(ax)
    return _png(fig)


def confusion_plot(report: dict) -> bytes:
    """The final model's confusion matrix (``report["evaluation"]``) with the class names:
    the full grid up to :data:`MAX_GRID_CLASSES` classes, else the most-confused
    (true → predicted) pairs as bars."""
    evaluation = report["evaluation"]
    labels, matrix = evaluation["labels"], evaluation["confusion_matrix"]
    title = (
        f"Confusion matrix of the round {evaluation['round']} model\n"
        "(server's held-out test set, released without DP noise)"
    )
    if len(labels) <= MAX_GRID_CLASSES:
        return _confusion_grid(labels, matrix, title)
    return _most_confused(labels, matrix, title)


def _confusion_grid(labels: list[str], matrix: list[list[int]], title: str) -> bytes:
    import numpy as np

    counts = np.asarray(matrix)
    side = max(5.0, 1.5 + 0.45 * len(labels))
    fig = _figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    # Colour by the share of each true class (row), so that a small class's errors show as
    # clearly as a large one's; the cells print the counts.
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    for (i, j), count in np.ndenumerate(counts):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize="small",
                color="white" if shares[i, j] > 0.5 else "black",
            )
    ticks = range(len(labels))
    # Class names are data, not mathtext: "$5 or $10" would otherwise be parsed (and may not parse).
    ax.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor", fontsize="small", parse_math=False)
    ax.set_yticks(ticks, labels, fontsize="small", parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    return _png(fig)


def most_confused_pairs(
    labels: list[str], matrix: list[list[int]], k: int = MOST_CONFUSED
) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as (true, predicted, count), largest first (ties
    in label order); cells of 0 are no confusion and are left out."""
    cells = [(count, i, j) for i, row in enumerate(matrix) for j, count in enumerate(row) if i != j and count > 0]
    return [(labels[i], labels[j], count) for count, i, j in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:k]]


def _most_confused(labels: list[str], matrix: list[list[int]], title: str) -> bytes:
    pairs = most_confused_pairs(labels, matrix)
    fig = _figure(figsize=(9, 1.5 + 0.3 * max(len(pairs), 3)))
    ax = fig.add_subplot()
    if pairs:
        names = [f"{true} → {predicted}" for true, predicted, _ in pairs]
        ax.barh(range(len(pairs)), [count for _, _, count in pairs], color="tab:red")
        ax.set_yticks(range(len(pairs)), names, fontsize="small", parse_math=False)
        ax.invert_yaxis()  # the most confused pair on top
        _integer_x_ticks(ax)
    else:
        ax.text(0.5, 0.5, "no test example was misclassified", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test examples (true → predicted)")
    ax.set_title(f"{title}: the {len(pairs)} most confused pairs of {len(labels)} classes", fontsize="medium")
    return _png(fig)


def per_client_plot(report: dict) -> bytes:
    """Each client's accuracy on its own held-out part: the global model against its personal
    one (a point per client; above the diagonal the personal model does better), or the global
    model's per client where there is no personal one."""
    evaluation = report["evaluation"]
    rows = [r for r in evaluation["per_client"] if r.get("global_accuracy") is not None]
    fig = _figure((6, 5.5))
    ax = fig.add_subplot()
    paired = [r for r in rows if r.get("personal_accuracy") is not None]
    if paired:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.scatter([r["global_accuracy"] for r in paired], [r["personal_accuracy"] for r in paired], color="tab:blue")
        for r in paired:
            ax.annotate(str(r["client_id"]), (r["global_accuracy"], r["personal_accuracy"]), fontsize="x-small")
        ax.set_xlabel("global model's accuracy on the client's held-out part")
        ax.set_ylabel("personal model's accuracy")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
    else:
        ax.bar([str(r["client_id"]) for r in rows], [r["global_accuracy"] for r in rows], color="tab:blue")
        ax.set_xlabel("client")
        ax.set_ylabel("global model's accuracy on the client's held-out part")
        ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Per client, round {evaluation['round']} (each device's own held-out data;\n"
        "read from the simulated devices' disks)"
    )
    return _png(fig)


def _figure(figsize: tuple[float, float] = (8, 4.5)) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100, layout="constrained")


def _integer_x_ticks(ax: Axes) -> None:
    """Rounds and example counts are whole numbers: no tick at round 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
