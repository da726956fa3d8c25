"""The model card (``README.md``) of an exported model, in the Hugging Face Hub's format.

YAML metadata first (``huggingface_hub.ModelCardData``: library, pipeline tag, tags, base
model, and where the weights came from: run, round, checkpoint SHA-256), then what the
model is, the lines that load and run it, its privacy guarantee and its evaluation.
Every privacy figure is formatted from the run's ``privacy_report.json`` (copied beside
the card); the recompute instructions are the report's own blocks, rendered by the
report's renderer, so the card and the report cannot say different things.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.report.render import document, to_markdown

#: The report's section the card repeats verbatim (common.report.render.document).
RECOMPUTE_HEADING = "Recomputing ε from privacy_report.json"
#: The card's file in the exported directory (where the Hub looks for it).
CARD_FILE = "README.md"


def write_card(out: Path, meta: dict, report: dict, cfg: dict) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    layout = meta["layout"]
    tags = ["text-classification", "differential-privacy", "federated-learning", "opacus", "flower", "fedpriv"]
    tags += {"setfit": ["setfit", "sentence-transformers"], "peft": ["peft", "lora"]}.get(layout, [])
    data = ModelCardData(
        library_name=meta["library"],
        pipeline_tag="text-classification",
        tags=tags,
        base_model=meta["base_model"],
        metrics=["accuracy"],
        fedpriv={
            k: meta[k]
            for k in ("run_id", "round", "checkpoint_file", "checkpoint_sha256", "layout", "merged", "fedpriv_version")
        },
    )
    sections = [
        f"# Federated, differentially private text classifier ({len(meta['labels'])} labels)",
        _what(meta, cfg),
        "## How to load",
        _how_to_load(out, meta),
        "## Privacy",
        *_privacy(meta, report, cfg),
        "## Evaluation",
        _evaluation(meta, report),
        "## Where the weights come from",
        (
            f"Round {meta['round']} of fedpriv run `{meta['run_id']}`: `{meta['checkpoint_file']}`, "
            f"SHA-256 `{meta['checkpoint_sha256']}` (verified against the run's checkpoint manifest before export). "
            f"`fedpriv_export.json` beside this card records the same."
        ),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card.save(out / CARD_FILE)


def _what(meta: dict, cfg: dict) -> str:
    model = cfg["model"]
    base = meta["base_model"] or (
        f"a randomly initialised encoder with the configuration of `{model['name_or_path']}` (model.pretrained=false)"
    )
    kind = {
        "setfit": "a linear head over pooled sentence features (sentence-transformers body, "
        "scikit-learn head: the SetFit layout)",
        "transformers": "a Hugging Face sequence classifier",
        "peft": "a LoRA adapter and classification head for the base model below (peft)",
    }[meta["layout"]]
    merged = " The run's LoRA adapter is merged into the encoder's weights." if meta["merged"] else ""
    return (
        f"Trained with fedpriv: {cfg['num_clients']} clients fine-tuned it with Flower and Opacus "
        f"(DP-SGD); only the global model left the federation. It is {kind}, starting from {base}.{merged} "
        f"Labels: {', '.join(f'`{label}`' for label in meta['labels'])}. Inputs are truncated to "
        f"{meta['max_length']} tokens, as in training (the tokenizer's `model_max_length`)."
    )


def _how_to_load(out: Path, meta: dict) -> str:
    where = str(Path(out).resolve())
    if meta["layout"] == "setfit":
        code = (
            "from setfit import SetFitModel\n"
            f"model = SetFitModel.from_pretrained({where!r})\n"
            'model.predict(["please refund my invoice"])  # labels; model.predict_proba(...) for probabilities'
        )
        needs = "Needs `setfit` (and sentence-transformers, scikit-learn); no fedpriv code."
    elif meta["layout"] == "transformers":
        code = (
            "from transformers import pipeline\n"
            f'classify = pipeline("text-classification", model={where!r})\n'
            'classify(["please refund my invoice"], truncation=True)'
        )
        needs = "Needs `transformers`; no fedpriv code."
    else:
        labels = dict(enumerate(meta["labels"]))
        code = (
            "from peft import AutoPeftModelForSequenceClassification\nfrom transformers import pipeline\n"
            f"model = AutoPeftModelForSequenceClassification.from_pretrained({where!r}, "
            f"num_labels={len(labels)}, id2label={labels!r}, label2id={ {v: k for k, v in labels.items()}!r})\n"
            f'pipeline("text-classification", model=model, tokenizer={where!r})'
            '(["please refund my invoice"], truncation=True)'
        )
        needs = (
            "Needs `peft` and `transformers`, and the base model where `adapter_config.json`'s "
            "`base_model_name_or_path` names it (the path it had on the machine that trained it; "
            "edit it to your copy). The label names are passed in because the base's config has none. "
            "`fedpriv export --merge` writes a plain transformers model instead."
        )
    return f"```python\n{code}\n```\n\n{needs}"


def _privacy(meta: dict, report: dict, cfg: dict) -> list[str]:
    sample, level = report["sample_level"], report["client_level"]
    rounds = report["rounds"]
    lines = [
        f"- Privacy mode: `{cfg['privacy']['mode']}`; {cfg['num_clients']} clients; "
        f"{len(rounds)} rounds completed (planned: {cfg['rounds']}); this model is round {meta['round']}'s.",
        "- Secure aggregation: "
        + (
            "on (the server saw only the sum of updates)."
            if report["secure_aggregation"]
            else "off (the server saw each client's update)."
        ),
    ]
    if sample["enabled"]:
        clients = sample["clients"]
        lines.append(
            f"- Sample level (unit protected: {sample['unit']}): accountant `{sample['accountant']}`, "
            f"δ = {sample['delta']:g}."
        )
        if clients:
            top = max(clients, key=lambda c: c["epsilon"])
            lines.append(
                f"- **Highest client ε: {top['epsilon']:.4f}** (client `{top['client_id']}`, δ = {sample['delta']:g})."
            )
    else:
        lines.append("- Sample level: off (no per-client ε).")
    if level.get("enabled"):
        eps = level.get("epsilon")
        lines.append(
            f"- Client level (unit protected: {level['unit']}): ε = "
            f"{'—' if eps is None else format(float(eps), '.4f')}, δ = {level.get('delta'):g}, "
            f"σ = {level.get('noise_multiplier')}, clipping norm = {level.get('clipping_norm')}."
        )
    else:
        lines.append("- Client level: off.")
    lines.append(
        "- The ε above covers everything the run released (every round's updates and the final "
        "model, and the metrics the caveats list); a model of an earlier round is covered by it too."
    )
    parts = ["\n".join(lines)]
    if sample["enabled"] and sample["clients"]:
        rows = ["| client | ε | budget ε | rounds trained | exhausted |", "|---|---|---|---|---|"]
        rows += [
            f"| {c['client_id']} | {c['epsilon']:.4f} | "
            f"{'—' if c.get('budget_epsilon') is None else format(float(c['budget_epsilon']), 'g')} | "
            f"{c['rounds_participated']} | {'yes' if c['exhausted'] else 'no'} |"
            for c in sample["clients"]
        ]
        parts.append("\n".join(rows))
    parts += [
        "### Caveats (from the privacy report)",
        "\n".join(f"- {c}" for c in report["caveats"]),
        "### Recomputing ε",
        _recompute(report),
    ]
    return parts


def _recompute(report: dict) -> str:
    blocks = document(report)
    start = blocks.index(("h2", RECOMPUTE_HEADING)) + 1
    end = next(i for i in range(start, len(blocks)) if blocks[i][0] in ("h1", "h2"))
    return "`privacy_report.json` beside this card is the run's report. " + to_markdown(blocks[start:end]).strip()


def _evaluation(meta: dict, report: dict) -> str:
    row = next((r for r in report["rounds"] if r["round"] == meta["round"]), None)
    if row is None:
        said = f"The report records no evaluation of round {meta['round']}."
    else:
        said = (
            f"Accuracy on the server's held-out test split after round {meta['round']}: "
            f"**{float(row['accuracy']):.4f}** (loss {float(row['loss']):.4f})."
        )
    detail = report.get("evaluation")
    if detail and report["rounds"] and meta["round"] == report["rounds"][-1]["round"]:
        said += "\n\n```json\n" + json.dumps(detail, indent=2) + "\n```"
    return said + " Evaluation metrics are released without DP noise (see the caveats)."
