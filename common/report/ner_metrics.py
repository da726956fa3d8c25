"""Entity-level scores of tagged sentences, computed by seqeval.

seqeval's default mode, not ``mode="strict"``: it reads tags as conlleval does, the
scorer behind published CoNLL and WNUT 17 numbers (and Hugging Face's ``seqeval``
metric), so a score here compares with theirs. The two modes agree on gold tags, which
:func:`common.data.conll.read_conll` has checked to be valid IOB2; they differ on an
ill-formed prediction (an ``I-X`` after ``O``): conlleval counts it as a predicted entity,
which costs precision when wrong, while strict mode drops it, so that a model emitting
broken spans would lose no precision for them.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities

_AVERAGES = ("micro avg", "macro avg", "weighted avg")


def entity_report(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """``micro_f1``, ``macro_f1`` and ``per_entity`` (entity type as the data names it →
    ``precision``, ``recall``, ``f1``, ``support``) over word-level IOB2 tag sequences.

    A type that neither the gold nor the predicted tags hold has no entry. A score with
    an empty denominator (a type never predicted, say) is 0, never a warning.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    gold, pred = [list(s) for s in gold], [list(s) for s in pred]
    if not get_entities(gold) and not get_entities(pred):
        # seqeval's macro average is a mean over no types (NaN, with a RuntimeWarning).
        return {"micro_f1": 0.0, "macro_f1": 0.0, "per_entity": {}}
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_entity = {
        kind: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for kind, row in report.items()
        if kind not in _AVERAGES
    }
    return {
        "micro_f1": float(report["micro avg"]["f1-score"]),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_entity": dict(sorted(per_entity.items())),
    }
