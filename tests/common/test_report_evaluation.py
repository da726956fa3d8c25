"""The report's per-class evaluation: the `evaluation` block, the rounds' F1, the per-class
table and confusion plot, and old run directories that have none."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
import torch.nn.functional as F

from common.report import (
    CAVEAT_EVAL_METRICS,
    CAVEAT_HELD_OUT,
    CONFUSION_PLOT,
    EVALUATION_KEYS,
    build_report,
    render_run_dir,
)
from common.report.plots import most_confused_pairs
from server.round.evaluate import Evaluation
from tests.common.test_report import PNG_MAGIC, ROUNDS, make_config, make_reported, write_run_dir

# Untrusted names from a data file: a pipe, markup, and dollars that matplotlib would read as mathtext.
NAMES = ["billing|refund", "<b>card</b>", "refund $5 or $10", "greeting", "never predicted"]


def evaluation_block(names, server_round=2, n=120, seed=0):
    """A block as the server writes it, for predictions that are right about two times in three
    and never the last label."""
    rng = random.Random(seed)
    true = [rng.randrange(len(names)) for _ in range(n)]
    last = len(names) - 1
    predicted = [t if t != last and rng.random() < 0.66 else rng.randrange(last) for t in true]
    logits = F.one_hot(torch.tensor(predicted), len(names)).float()
    return Evaluation.of(logits, torch.tensor(true), loss_sum=0.5 * n).block(names, server_round)


def f1_rounds(evaluation):
    rounds = [dict(r) for r in ROUNDS]
    for r in rounds:
        r["macro_f1"], r["weighted_f1"] = (
            (0.5, 0.6) if r["round"] == 1 else (evaluation["macro_f1"], evaluation["weighted_f1"])
        )
    return rounds


def run_dir_with_evaluation(tmp_path, names=NAMES, **kwargs):
    evaluation = evaluation_block(names, **kwargs)
    run_dir = write_run_dir(tmp_path / "run", rounds=f1_rounds(evaluation))
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    return run_dir, evaluation


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_the_report_carries_the_final_models_block_and_each_rounds_f1():
    evaluation = evaluation_block(NAMES)
    report = build_report(
        config=make_config(), clients_reported=make_reported(), rounds=f1_rounds(evaluation), evaluation=evaluation
    )
    block = report["evaluation"]
    assert tuple(block) == EVALUATION_KEYS
    assert block == {key: evaluation[key] for key in EVALUATION_KEYS}
    assert list(block["per_class"]) == NAMES == block["labels"]
    assert block["per_class"]["never predicted"]["precision"] == 0.0  # zero_division=0, not absent
    assert [r["macro_f1"] for r in report["rounds"]] == [0.5, evaluation["macro_f1"]]
    assert [r["weighted_f1"] for r in report["rounds"]] == [0.6, evaluation["weighted_f1"]]
    # The old sentence stays word for word (scripts grep it); the new one says what is held out.
    assert CAVEAT_EVAL_METRICS in report["caveats"] and CAVEAT_HELD_OUT in report["caveats"]
    assert "held-out" in CAVEAT_HELD_OUT and "without DP noise" in CAVEAT_HELD_OUT
    assert "confusion matrix" in CAVEAT_HELD_OUT


def test_an_old_run_directory_re_renders_without_an_evaluation(tmp_path):
    run_dir = write_run_dir(tmp_path / "run")  # no evaluation.json, rounds without F1
    report = render_run_dir(run_dir)
    assert report["evaluation"] is None
    assert json.loads((run_dir / "privacy_report.json").read_text())["evaluation"] is None
    assert all(r["macro_f1"] is None for r in report["rounds"])
    assert CAVEAT_HELD_OUT not in report["caveats"] and CAVEAT_EVAL_METRICS in report["caveats"]
    assert not (run_dir / CONFUSION_PLOT).exists()
    assert "holds no per-class evaluation" in (run_dir / "privacy_report.md").read_text()
    assert CONFUSION_PLOT not in (run_dir / "privacy_report.html").read_text()  # no link to a missing image


def test_per_class_table_round_f1_and_confusion_grid_are_rendered(tmp_path):
    run_dir, evaluation = run_dir_with_evaluation(tmp_path)
    report = render_run_dir(run_dir)
    md = (run_dir / "privacy_report.md").read_text()
    page = (run_dir / "privacy_report.html").read_text()

    assert "| class | precision | recall | F1 | support |" in md
    pipe = evaluation["per_class"]["billing|refund"]
    assert (
        f"| billing\\|refund | {pipe['precision']:.4f} | {pipe['recall']:.4f} | {pipe['f1']:.4f} | {pipe['support']} |"
    ) in md
    assert "| round | accuracy | loss | macro F1 | weighted F1 |" in md
    assert f"| 2 | 0.8400 | 0.4500 | {evaluation['macro_f1']:.4f} | {evaluation['weighted_f1']:.4f} |" in md
    assert md.index("## Rounds") < md.index("## Evaluation of the final model") < md.index("## Caveats")
    assert "zero_division=0" in md
    assert "&lt;b&gt;card&lt;/b&gt;" in page and "<b>card</b>" not in page
    assert f'src="{CONFUSION_PLOT}"' in page and f"]({CONFUSION_PLOT})" in md
    plot = (run_dir / CONFUSION_PLOT).read_bytes()
    assert plot.startswith(PNG_MAGIC) and len(plot) > 5_000

    # Rendering again from the run directory alone gives the same block.
    assert render_run_dir(run_dir)["evaluation"] == report["evaluation"]
    assert json.loads((run_dir / "privacy_report.json").read_text())["evaluation"] == {
        key: evaluation[key] for key in EVALUATION_KEYS
    }


def test_above_twenty_classes_the_plot_shows_the_most_confused_pairs(tmp_path):
    names = [f"intent_{k:02d}" for k in range(77)]
    run_dir, evaluation = run_dir_with_evaluation(tmp_path, names=names, n=1500)
    report = render_run_dir(run_dir)
    assert len(report["evaluation"]["per_class"]) == 77
    plot = (run_dir / CONFUSION_PLOT).read_bytes()
    assert plot.startswith(PNG_MAGIC)
    width, height = png_size(plot)
    assert width <= 1000 and height <= 1000  # a readable chart, not a 77 × 77 grid (≥ 3,600 px wide)
    twenty, _ = run_dir_with_evaluation(tmp_path / "twenty", names=names[:20])
    render_run_dir(twenty)
    assert png_size((twenty / CONFUSION_PLOT).read_bytes())[0] > 1000  # 20 classes: the full grid


def test_most_confused_pairs_are_the_largest_off_diagonal_cells_by_name():
    names = ["a", "b", "c"]
    matrix = [[9, 4, 0], [1, 7, 4], [6, 0, 2]]
    assert most_confused_pairs(names, matrix, k=3) == [("c", "a", 6), ("a", "b", 4), ("b", "c", 4)]
    assert most_confused_pairs(names, [[5, 0, 0], [0, 5, 0], [0, 0, 5]]) == []


def test_an_evaluation_of_a_round_that_never_completed_is_left_out(tmp_path):
    # The server writes evaluation.json just before the round's metrics line: a crash between
    # the two leaves the block one round ahead of metrics.jsonl.
    run_dir, _ = run_dir_with_evaluation(tmp_path, server_round=3)
    (run_dir / CONFUSION_PLOT).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFUSION_PLOT).write_bytes(b"left by an earlier rendering")
    report = render_run_dir(run_dir)
    assert report["evaluation"] is None
    assert any("round 3, not of the last completed round (2" in c for c in report["caveats"])
    assert not (run_dir / CONFUSION_PLOT).exists()


def test_a_broken_evaluation_file_is_named(tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    (run_dir / "evaluation.json").write_text('{"round": 2, "acc')
    with pytest.raises(ValueError, match="evaluation.json"):
        render_run_dir(run_dir)
