"""Central evaluation of the global model on the held-out test split (server side).

Everything it measures (accuracy, loss, macro / weighted F1, the per-class block and the
confusion matrix; for token classification the entity-level F1s and the per-entity block)
is released without DP noise; the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torch.utils.data import TensorDataset

from common.data.conll import IGNORE, Aligned, predicted_tags
from common.data.features import labelled_positions
from common.model.state import load_trainable, model_inputs
from common.report.ner_metrics import entity_report

#: sklearn's value for a ratio whose denominator is zero: a class never predicted has
#: precision 0, a class absent from the test set recall 0 (and F1 0). Explicit, so that
#: sklearn neither warns nor may change its default under us.
ZERO_DIVISION = 0.0


@dataclass(frozen=True)
class Evaluation:
    """One pass of the global model over the test split: the two scalars the rounds always
    had, and every example's true and predicted label (in the split's order), from which
    the F1s follow.

    Labels are indices into the run's label names (``Prepared.label_names``); the F1s are
    over all ``num_labels`` of them, so macro F1 is the plain mean of the per-class F1 of
    :meth:`block`, a label absent from the test set and never predicted counting 0.
    """

    accuracy: float
    loss: float
    true: tuple[int, ...]
    predicted: tuple[int, ...]
    num_labels: int

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float) -> "Evaluation":
        """From the logits of every example (rows aligned with ``labels``) and their summed cross-entropy."""
        predicted = logits.argmax(dim=-1)
        n = len(labels)
        return cls(
            int((predicted == labels).sum()) / n,
            loss_sum / n,
            tuple(labels.tolist()),
            tuple(predicted.tolist()),
            int(logits.shape[-1]),
        )

    @property
    def macro_f1(self) -> float:
        return self._f1("macro")

    @property
    def weighted_f1(self) -> float:
        return self._f1("weighted")

    def _f1(self, average: str) -> float:
        return float(
            f1_score(
                self.true, self.predicted, labels=range(self.num_labels), average=average, zero_division=ZERO_DIVISION
            )
        )

    def block(self, label_names: Sequence[str], server_round: int) -> dict:
        """The report's ``evaluation`` block (DESIGN.md) of the model after ``server_round``:
        the scalars, ``per_class`` keyed by label name in ``labels`` order, and the confusion
        matrix (rows true, columns predicted, in that order)."""
        if len(label_names) != self.num_labels:
            raise ValueError(f"{len(label_names)} label names for a model with {self.num_labels} outputs")
        ids = list(range(self.num_labels))
        precision, recall, f1, support = precision_recall_fscore_support(
            self.true, self.predicted, labels=ids, average=None, zero_division=ZERO_DIVISION
        )
        names = [str(name) for name in label_names]
        return {
            "round": server_round,
            "num_examples": len(self.true),
            "accuracy": self.accuracy,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "labels": names,
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(names, precision, recall, f1, support)
            },
            "confusion_matrix": confusion_matrix(self.true, self.predicted, labels=ids).tolist(),
        }


@dataclass(frozen=True)
class HeldOutWords:
    """The server's tagged test sentences: their subword alignment and gold word tags."""

    aligned: Aligned
    gold: list[list[str]]


@dataclass(frozen=True)
class TokenEvaluation:
    """One pass of the global token classifier over the test sentences, scored on words.

    ``accuracy`` is over every gold word (a word cut by ``train.max_length`` counts as
    predicted O), ``loss`` the mean over sentences of their summed token cross-entropy (the
    training loss, unweighted), ``entities`` seqeval's report (``common.report.ner_metrics``).
    """

    accuracy: float
    loss: float
    entities: dict
    num_examples: int
    words_cut: int

    @classmethod
    def of(
        cls, logits: torch.Tensor, words: HeldOutWords, label_names: Sequence[str], loss_sum: float
    ) -> "TokenEvaluation":
        """From subword logits [N, L, K] at the aligned positions and their summed cross-entropy."""
        predicted = predicted_tags(logits, words.aligned, label_names)
        total = sum(len(g) for g in words.gold)
        right = sum(p == g for ps, gs in zip(predicted, words.gold) for p, g in zip(ps, gs))
        n = len(words.gold)
        return cls(
            right / max(total, 1),
            loss_sum / max(n, 1),
            entity_report(words.gold, predicted),
            n,
            int(sum(words.aligned.words_cut)),
        )

    @property
    def micro_f1(self) -> float:
        return self.entities["micro_f1"]

    @property
    def macro_f1(self) -> float:
        return self.entities["macro_f1"]

    @property
    def weighted_f1(self) -> float:
        rows = self.entities["per_entity"].values()
        support = sum(r["support"] for r in rows)
        return sum(r["f1"] * r["support"] for r in rows) / support if support else 0.0

    def block(self, label_names: Sequence[str], server_round: int) -> dict:
        """The report's ``evaluation`` block for token classification (DESIGN.md)."""
        return {
            "round": server_round,
            "num_examples": self.num_examples,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "micro_f1": self.micro_f1,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "labels": [str(name) for name in label_names],
            "per_entity": self.entities["per_entity"],
            "words_cut": self.words_cut,
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    data: TensorDataset,
    *,
    batch_size: int,  # evaluation.batch_size (conf/config.yaml)
    words: HeldOutWords | None = None,
    label_names: Sequence[str] | None = None,
) -> Evaluation | TokenEvaluation:
    """The :class:`Evaluation` of ``model`` with trainable weights ``state``.

    Every example is scored once, as in a plain pass over ``data``; only the batching
    differs: examples go longest first and each batch is cut to its longest real
    (attention-masked) length. The test split is padded to ``train.max_length``
    (common.data.tokenizing.tokenize) and the columns cut are padding every example of the batch
    masks out, so the logits are those of the padded batch up to float rounding
    (the metrics agree to ~1e-7; the test compares them), in less time (docs/server.md).
    Left-padded data, whose padding is not a suffix, is evaluated uncut. Batches go to
    the model's device (the server's model lives on the CPU; a GPU sweep moves it).
    Tagged data (labels [N, L], with ``words`` and ``label_names``) gives a
    :class:`TokenEvaluation`.
    """
    load_trainable(model, state)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = data.tensors
    n = len(labels)
    lengths = attention_mask.sum(dim=1)
    suffix_padded = bool((attention_mask.cumsum(dim=1).eq(lengths[:, None]) | attention_mask.bool()).all())
    order = torch.argsort(lengths, descending=True, stable=True) if suffix_padded else torch.arange(n)
    loss_sum, chunks = 0.0, []
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        width = max(int(lengths[idx].max()), 1) if suffix_padded else input_ids.shape[1]
        batch = model_inputs(input_ids[idx, :width].to(device), attention_mask[idx, :width].to(device))
        logits = model(**batch).logits
        if words is not None:  # [B, width, K]: pad back to the full length
            target = labels[idx, :width].to(device)
            loss_sum += float(
                F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
            )
            logits = F.pad(logits, (0, 0, 0, input_ids.shape[1] - width))
        else:
            loss_sum += float(F.cross_entropy(logits, labels[idx].to(device), reduction="sum"))
        chunks.append(logits.float().cpu())
    model.train(was_training)
    scored = torch.cat(chunks)
    logits = torch.empty_like(scored)
    logits[order] = scored  # back in data order: ``true`` and ``predicted`` align with ``data``
    if words is not None:
        return TokenEvaluation.of(logits, words, label_names, loss_sum)
    return Evaluation.of(logits, labels, loss_sum)


@torch.no_grad()
def evaluate_head(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    features: TensorDataset,
    *,
    words: HeldOutWords | None = None,
    label_names: Sequence[str] | None = None,
) -> Evaluation | TokenEvaluation:
    """:func:`evaluate` for a round that changed the head alone (the recipe's prototype and
    head stages): the head over the test set's pooled features, computed once
    (``common.data.features``) from the same frozen encoder — the logits a full pass would give."""
    load_trainable(model, state)
    head = model.classifier
    feats, labels = features.tensors
    logits = head(feats.to(head.weight.device)).float()
    labels = labels.to(logits.device)
    if words is not None:  # packed word slots (common.data.features.token_features) back to subword positions
        loss_sum = float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"))
        full = torch.zeros((*words.aligned.labels.shape, logits.shape[-1]))
        for i, at in enumerate(labelled_positions(words.aligned.labels)):
            full[i, at] = logits[i, : len(at)].cpu()
        return TokenEvaluation.of(full, words, label_names, loss_sum)
    return Evaluation.of(logits.cpu(), labels.cpu(), float(F.cross_entropy(logits, labels, reduction="sum")))
