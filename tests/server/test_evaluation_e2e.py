"""A real (in-process) run writes the per-class evaluation of its final model: every round's
macro and weighted F1 in metrics.jsonl, evaluation.json, the report's block and the confusion
plot, and `fedpriv report` rebuilds the same block from the run directory alone."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support

from common.model.state import model_inputs
from common.report import CAVEAT_HELD_OUT, read_metrics, render_run_dir
from server.release.released import load_released
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_run_reports_per_class_results_of_its_final_model(task_identity, fast_cfg, tmp_path):
    prepared = prepare(fast_cfg("num_clients=2", "rounds=2", "node_wait_s=5"))
    run_dir = tmp_path / "run"
    report = run_federation(InProcessGrid(2), prepared, run_dir)

    lines = read_metrics(run_dir)
    assert [r["round"] for r in lines] == [1, 2]
    for line, row in zip(lines, report["rounds"]):
        assert 0.0 <= line["macro_f1"] <= 1.0 and 0.0 <= line["weighted_f1"] <= 1.0
        assert (row["macro_f1"], row["weighted_f1"]) == (line["macro_f1"], line["weighted_f1"])

    evaluation = report["evaluation"]
    assert evaluation == json.loads((run_dir / "privacy_report.json").read_text())["evaluation"]
    assert evaluation["round"] == 2 and evaluation["labels"] == prepared.label_names
    assert list(evaluation["per_class"]) == prepared.label_names
    assert (evaluation["accuracy"], evaluation["macro_f1"]) == (lines[-1]["accuracy"], lines[-1]["macro_f1"])
    assert CAVEAT_HELD_OUT in report["caveats"]
    assert (run_dir / "plots/confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)

    # Independently: the released final model over the test split, scored by scikit-learn.
    released = load_released(run_dir)
    ids, mask, labels = released.test_set().tensors
    with torch.no_grad():
        predicted = released.model(**model_inputs(ids, mask)).logits.argmax(-1).tolist()
    true, classes = labels.tolist(), list(range(len(prepared.label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=classes, zero_division=0)
    for k, name in enumerate(prepared.label_names):
        assert evaluation["per_class"][name] == pytest.approx(
            {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}
        )
    assert evaluation["macro_f1"] == pytest.approx(
        f1_score(true, predicted, labels=classes, average="macro", zero_division=0)
    )

    (run_dir / "plots/confusion_matrix.png").unlink()
    rebuilt = render_run_dir(run_dir)
    assert rebuilt["evaluation"] == evaluation and rebuilt["rounds"] == report["rounds"]
    assert (run_dir / "plots/confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)
