"""The ``fedpriv explain`` page: one self-contained HTML file a person can read.

No script, no stylesheet or font from elsewhere: the attention maps are inline PNGs
(drawn on an explicit Agg canvas, as the report's figures are) and every text that came
from a tokenizer, a label or a user is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.report.render import HTML_STYLE
from common.rundir import RunDir
from common.storage import atomic_write_bytes
from server.release.explain import Explanation, explain_released
from server.release.released import load_released

#: Tokens per axis up to which every attention map names its tokens; longer texts show
#: the grid only (the token order is the one of the shaded text above it).
MAX_LABELLED_TOKENS = 40
#: Classes listed with their probability per input (the rest are summed).
TOP_CLASSES = 5

PAGE_STYLE = (
    HTML_STYLE
    + """
.tokens { line-height: 2.2; font-family: ui-monospace, monospace; font-size: .95rem; }
.tok { padding: .15rem .2rem; margin: 0 .05rem; border-radius: .2rem; }
.special { color: #777; }
.predicted { font-size: 1.15rem; }
.note { color: #444; font-size: .9rem; }
.maps { overflow-x: auto; }
.maps img { max-width: none; }
"""
)

SUMMARY_NOTE = (
    "Token shading is leave-one-out: how much the predicted class's probability drops when the model "
    "reads the text without that token (hidden from attention and pooling, like padding). "
    "Orange: the token pushes the model towards its prediction; blue: away from it; the deeper, the more. "
    "Hover a token for its score."
)
ATTENTION_NOTE = (
    "Attention maps: one per layer (rows, first layer at the top) and head (columns), as the model "
    "computes them. In each map, row i shows where token i looks: its attention over the tokens "
    "(columns), which sums to 1. Darker is more attention. Attention shows where the model looks, "
    "not what decides its prediction; the shading above measures that."
)


def render_page(
    explanations: Sequence[Explanation], *, title: str, context: str, true_labels: Sequence[str] | None = None
) -> str:
    """The page: ``context`` (plain words on what model and which texts), then one section per text."""
    e = html.escape
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f"<title>{e(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{e(title)}</h1>\n<p>{e(context)}</p>\n",
        f'<p class="note">{e(SUMMARY_NOTE)}</p>\n<p class="note">{e(ATTENTION_NOTE)}</p>\n',
    ]
    if true_labels is not None and len(true_labels) != len(explanations):
        raise ValueError(f"{len(true_labels)} true labels for {len(explanations)} texts")
    for number, explanation in enumerate(explanations, start=1):
        parts.append(_section(number, explanation, None if true_labels is None else true_labels[number - 1]))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _section(number: int, x: Explanation, true_label: str | None) -> str:
    e = html.escape
    layers, heads = x.attentions.shape[:2]
    truth = "" if true_label is None else f"; true class: <strong>{e(true_label)}</strong>"
    return (
        f"<h2>Input {number}</h2>\n<pre>{e(x.text)}</pre>\n"
        f'<p class="predicted">Predicted class: <strong>{e(x.label)}</strong> '
        f"(probability {x.probability:.1%}){truth}</p>\n"
        f"{_class_table(x.probabilities)}"
        f"<p>Tokens that push hardest towards <strong>{e(x.label)}</strong>: "
        f"{e(', '.join(x.top_tokens())) or 'none'}</p>\n"
        f'<p class="tokens">{_shaded_tokens(x)}</p>\n'
        f"<h3>Attention maps ({layers} layers x {heads} heads, {len(x.tokens)} tokens)</h3>\n"
        f'<div class="maps"><img alt="attention maps of input {number}: {layers} layers by {heads} heads" '
        f'src="data:image/png;base64,{base64.b64encode(attention_png(x)).decode("ascii")}"></div>\n'
    )


def _class_table(probabilities: dict[str, float]) -> str:
    e = html.escape
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    rows = "".join(f"<tr><td>{e(name)}</td><td>{p:.1%}</td></tr>" for name, p in ranked[:TOP_CLASSES])
    rest = ranked[TOP_CLASSES:]
    if rest:
        rows += f"<tr><td>{len(rest)} other classes</td><td>{sum(p for _, p in rest):.1%}</td></tr>"
    return f"<table><tr><th>class</th><th>probability</th></tr>{rows}</table>\n"


def _shaded_tokens(x: Explanation) -> str:
    scale = float(np.max(np.abs(x.scores))) or 1.0
    spans = []
    for token, score, special in zip(x.tokens, x.scores, x.special):
        strength = min(1.0, abs(float(score)) / scale)
        colour = "230, 120, 20" if score > 0 else "40, 110, 220"
        style = f"background: rgba({colour}, {0.85 * strength:.2f})"
        kind = "tok special" if special else "tok"
        spans.append(f'<span class="{kind}" style="{style}" title="{float(score):+.4f}">{html.escape(token)}</span>')
    return " ".join(spans)


def attention_png(x: Explanation) -> bytes:
    """All attention maps of one input as a layers x heads grid of heatmaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, heads, length = x.attentions.shape[:3]
    labelled = length <= MAX_LABELLED_TOKENS
    # Room for a 6-point label per token when the tokens are named; the page scrolls sideways.
    cell = max(1.6, 0.11 * length + 0.4) if labelled else 1.6
    fig = Figure(figsize=(cell * heads + (1.2 if labelled else 0.4), cell * layers + 0.6), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(layers, heads, squeeze=False)
    font = 6.0
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(x.attentions[layer, head], cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if labelled and head == 0:
                ax.set_yticks(range(length), x.tokens, fontsize=font)
            if labelled and layer == layers - 1:
                ax.set_xticks(range(length), x.tokens, fontsize=font, rotation=90)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- writing it -------------------------------------------------------------------

#: ``fedpriv explain``'s page in the run directory unless ``--out`` says otherwise.
CLI_PAGE = "explain.html"
#: The page a run writes at its end for a few inputs of the server's test split; its
#: own name, so that ``fedpriv explain`` never overwrites it.


def write_explanations(
    released, texts: Sequence[str], out: Path, *, source: str, true_labels: Sequence[str] | None = None
) -> list[Explanation]:
    """Explain ``texts`` with the released model and write the page to ``out``.

    ``source`` says in plain words where the texts came from ("given on the command
    line"); ``true_labels``, when known, are shown beside the predictions.
    """
    explanations = explain_released(released, texts)
    sha = released.checkpoint_sha256
    context = (
        f"This page shows how the released global model of the run in {released.run_dir.name} "
        f"(after round {released.server_round}, checkpoint SHA-256 {sha[:16]}...) behaves on "
        f"{len(texts)} text{'s' if len(texts) != 1 else ''} {source}. It was computed from the "
        "released model and these texts alone: no client data was used."
    )
    page = render_page(
        explanations, title="What the released model attends to", context=context, true_labels=true_labels
    )
    atomic_write_bytes(Path(out), page.encode("utf-8"))
    return explanations


def write_run_explanations(run_dir: Path, released=None, *, count: int = 3) -> Path:
    """``RUN_DIR/explain_test_set.html`` for ``count`` inputs of the server's test split.

    The inputs are the first test examples of distinct true classes (then the next
    ones), so a few inputs show more than one class. ``released`` defaults to the run's
    last checkpointed round, read back as ``fedpriv explain`` reads it.
    """
    run_dir = Path(run_dir)
    released = released if released is not None else load_released(run_dir)
    test = released.test_split()
    chosen = _spread_over_classes(list(test["label"]), count)
    if not chosen:
        raise ValueError(f"the server's test split of {run_dir} is empty: nothing to explain")
    out = RunDir(run_dir).explain_page
    write_explanations(
        released,
        [test[i]["text"] for i in chosen],
        out,
        source="from the server's test split (the run's own evaluation data)",
        true_labels=[released.label_names[test[i]["label"]] for i in chosen],
    )
    return out


def _spread_over_classes(labels: Sequence[int], count: int) -> list[int]:
    seen: set[int] = set()
    firsts = []
    for i, label in enumerate(labels):
        if label not in seen:
            seen.add(label)
            firsts.append(i)
    firsts = firsts[:count]
    rest = [i for i in range(len(labels)) if i not in firsts][: count - len(firsts)]
    return sorted(firsts + rest)
