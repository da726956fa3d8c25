"""Central evaluation: length-cut batches score exactly what a plain padded pass scores."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.data import load_splits, tokenize
from common.model import instantiate_model, load_tokenizer, model_inputs, trainable_state
from server.evaluate import evaluate


@torch.no_grad()
def plain_pass(model, data, batch_size):
    """The reference: every example at the full padded width, in data order."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for ids, mask, labels in DataLoader(data, batch_size=batch_size):
        logits = model(**model_inputs(ids, mask)).logits
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(data), loss_sum / len(data)


@pytest.fixture
def model_and_test(fast_cfg):
    cfg = fast_cfg()
    _, test, labels = load_splits(cfg["data"], seed=0, num_clients=int(cfg["num_clients"]))
    data = tokenize(test, load_tokenizer(cfg["model"]), int(cfg["train"]["max_length"]))
    model = instantiate_model(cfg, len(labels))
    with torch.no_grad():  # a head that is not at its initialisation: logits that differ per example
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model, data


def test_cut_batches_match_the_padded_pass(model_and_test):
    model, data = model_and_test
    lengths = data.tensors[1].sum(1)
    assert int(lengths.max()) < data.tensors[1].shape[1]  # there is padding to cut
    want = plain_pass(model, data, 16)
    got = evaluate(model, trainable_state(model), data, batch_size=16)
    assert got[0] == want[0]
    assert math.isclose(got[1], want[1], rel_tol=1e-5)
    assert model.training  # mode restored


def test_left_padding_is_not_cut(model_and_test):
    model, data = model_and_test
    ids, mask, labels = data.tensors
    flipped = TensorDataset(ids.flip(1), mask.flip(1), labels)  # padding first: must not be cut away
    want = plain_pass(model, flipped, 16)
    assert evaluate(model, trainable_state(model), flipped, batch_size=16) == want  # same batches, same order
