"""Central evaluation of the global model on the held-out test split (server side).

Its accuracy and loss are released without DP noise; the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from common.model import load_trainable, model_inputs


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    data: TensorDataset,
    *,
    batch_size: int,  # evaluation.batch_size (conf/config.yaml)
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` with trainable weights ``state``.

    Every example is scored once, as in a plain pass over ``data``; only the batching
    differs: examples go longest first and each batch is cut to its longest real
    (attention-masked) length. The test split is padded to ``train.max_length``
    (common.data.tokenize) and the columns cut are padding every example of the batch
    masks out, so the logits are those of the padded batch up to float rounding
    (the metrics agree to ~1e-7; the test compares them). On the synthetic set (mean
    22 of 40 tokens) MiniLM's evaluation took 4.4 s instead of 7.4 s on one thread.
    Left-padded data, whose padding is not a suffix, is evaluated uncut. Batches go to
    the model's device (the server's model lives on the CPU; a GPU sweep moves it).
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
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        width = max(int(lengths[idx].max()), 1) if suffix_padded else input_ids.shape[1]
        batch = model_inputs(input_ids[idx, :width].to(device), attention_mask[idx, :width].to(device))
        logits = model(**batch).logits
        target = labels[idx].to(device)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == target).sum())
    model.train(was_training)
    return correct / n, loss_sum / n


@torch.no_grad()
def evaluate_head(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    features: TensorDataset,
) -> tuple[float, float]:
    """:func:`evaluate` for a round that changed the head alone (the recipe's prototype and
    head stages): the head over the test set's pooled features, computed once
    (``common.features``) from the same frozen encoder — the logits a full pass would give."""
    load_trainable(model, state)
    head = model.classifier
    feats, labels = features.tensors
    logits = head(feats.to(head.weight.device)).float()
    labels = labels.to(logits.device)
    n = len(labels)
    return (int((logits.argmax(dim=-1) == labels).sum()) / n,
            float(F.cross_entropy(logits, labels, reduction="sum")) / n)
