"""``fedpriv predict MODEL_OR_RUN``: labels and probabilities for texts.

``MODEL_OR_RUN`` is an export (:mod:`server.release.export`: read with the library its layout
names — SetFit, a transformers pipeline, peft — exactly as its model card loads it) or a
run directory (its released model, :func:`server.release.released.load_released`). Texts are
truncated to the run's ``train.max_length``, as the run evaluated them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from common.rundir import RunDir
from server.release.export import EXPORT_META, ExportError

#: (label, probability of that label) per text.
Predict = Callable[[Sequence[str]], list[tuple[str, float]]]


def predictor(path: str | Path, *, server_round: int | None = None) -> Predict:
    path = Path(path)
    if RunDir(path).is_run():
        return _run_predictor(path, server_round)
    if server_round is not None:
        raise ExportError(f"--round: {path} is an exported model, which holds one round already")
    if (path / "config_setfit.json").is_file():
        return _setfit_predictor(path)
    if (path / "adapter_config.json").is_file():
        return _peft_predictor(path)
    if (path / "config.json").is_file():
        return _pipeline_predictor(path, model=str(path))
    raise FileNotFoundError(
        f"MODEL_OR_RUN {path}: neither a fedpriv run directory (.hydra/config.yaml) "
        "nor an exported model (config_setfit.json, adapter_config.json or config.json)"
    )


def _run_predictor(run_dir: Path, server_round: int | None) -> Predict:
    import torch

    from common.model.state import model_inputs
    from server.release.released import load_released

    released = load_released(run_dir, server_round)
    max_length = int(released.cfg["train"]["max_length"])

    @torch.no_grad()
    def predict(texts):
        enc = released.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = released.model(**model_inputs(enc["input_ids"], enc["attention_mask"])).logits.softmax(-1)
        best = probs.argmax(-1)
        return [(released.label_names[int(i)], float(p[i])) for i, p in zip(best, probs)]

    return predict


def _setfit_predictor(path: Path) -> Predict:
    from setfit import SetFitModel

    model = SetFitModel.from_pretrained(str(path), device="cpu")

    def predict(texts):
        probs = model.predict_proba(list(texts), as_numpy=True)
        return [(model.labels[int(p.argmax())], float(p.max())) for p in probs]

    return predict


def _peft_predictor(path: Path) -> Predict:
    from peft import AutoPeftModelForSequenceClassification

    meta_path = path / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: an adapter's label names are kept there")
    labels = json.loads(meta_path.read_text())["labels"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(path),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return _pipeline_predictor(path, model=model)


def _pipeline_predictor(path: Path, *, model) -> Predict:
    from transformers import pipeline

    classify = pipeline("text-classification", model=model, tokenizer=str(path), device="cpu")

    def predict(texts):
        # truncation=True: the tokenizer's model_max_length is the run's train.max_length.
        return [(r["label"], float(r["score"])) for r in classify(list(texts), truncation=True)]

    return predict


def read_texts(file: str | Path, column: str) -> list[str]:
    """The ``column`` of a CSV file with a header row."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"--file {file} does not exist")
    with open(file, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise ExportError(
                f"--text-column {column!r}: {file} has no such column "
                f"(its header names {', '.join(map(repr, reader.fieldnames or []))})"
            )
        return [row[column] or "" for row in reader]
