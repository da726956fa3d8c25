"""Entity-level scores (common/report/ner_metrics.py) against hand counts and seqeval's own."""

import json
import random
import warnings

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from common.data.conll import read_conll
from common.report.ner_metrics import entity_report
from tests.conftest import SHARED_DATA

GOLD = [["B-person", "I-person", "O", "B-location"], ["B-creative-work", "I-creative-work", "O"]]
PRED = [
    ["B-person", "I-person", "O", "B-person"],  # person right; the location called a person
    ["B-creative-work", "O", "O"],
]  # creative-work cut short: a wrong span


def test_scores_match_a_hand_count():
    report = entity_report(GOLD, PRED)
    # person: 1 right of 2 predicted, 1 gold; location: 0 of 0 predicted, 1 gold;
    # creative-work: 0 of 1 predicted, 1 gold. Micro: 1 right, 3 predicted, 3 gold.
    assert report["per_entity"] == {
        "creative-work": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "location": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "person": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
    }
    assert report["micro_f1"] == pytest.approx(1 / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    json.dumps(report)  # plain floats and ints, ready for privacy_report.json


def test_scores_match_seqeval_on_real_tags_with_errors():
    gold = read_conll(SHARED_DATA / "wnut17" / "emerging.dev.conll").tags
    rng = random.Random(0)
    tags = ["O", "B-person", "I-person", "B-location", "B-group", "I-group"]
    pred = [[rng.choice(tags) if rng.random() < 0.1 else t for t in s] for s in gold]
    report = entity_report(gold, pred)
    assert report["micro_f1"] == pytest.approx(f1_score(gold, pred, average="micro"))
    assert report["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    per_type_p = precision_score(gold, pred, average=None, zero_division=0)
    per_type_r = recall_score(gold, pred, average=None, zero_division=0)
    assert [e["precision"] for e in report["per_entity"].values()] == pytest.approx(list(per_type_p))
    assert [e["recall"] for e in report["per_entity"].values()] == pytest.approx(list(per_type_r))
    assert sorted(report["per_entity"]) == ["corporation", "creative-work", "group", "location", "person", "product"]
    assert 0.3 < report["micro_f1"] < 0.95  # the noise did cost something, not everything


def test_an_i_tag_after_o_in_a_prediction_is_an_entity_as_in_conlleval():
    # The default (conlleval) reading, not strict IOB2, which would not count this entity.
    gold = [["O", "B-person", "I-person"]]
    assert entity_report(gold, [["O", "I-person", "I-person"]])["micro_f1"] == 1.0
    # ... and a wrong one of these costs precision
    report = entity_report(gold, [["I-group", "B-person", "I-person"]])
    assert report["per_entity"]["group"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["micro_f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_no_entities_anywhere_scores_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert entity_report([["O", "O"]], [["O", "O"]]) == {"micro_f1": 0.0, "macro_f1": 0.0, "per_entity": {}}
        missed = entity_report([["B-person"]], [["O"]])
    assert missed["per_entity"]["person"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        entity_report(GOLD, PRED[:1])
    with pytest.raises(ValueError, match="sentence 1: 3 gold tags but 2 predicted"):
        entity_report(GOLD, [PRED[0], PRED[1][:2]])
