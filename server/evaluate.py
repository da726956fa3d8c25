"""Central evaluation of the global model on the held-out test split (server side).

Its accuracy and loss are released without DP noise; the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.model import load_trainable, model_inputs


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    data: TensorDataset,
    *,
    batch_size: int = 64,
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` with trainable weights ``state``."""
    load_trainable(model, state)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=batch_size):
        logits = model(**model_inputs(input_ids, attention_mask)).logits
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    n = len(data)
    return correct / n, loss_sum / n
