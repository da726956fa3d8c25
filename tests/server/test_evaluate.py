"""Central evaluation: length-cut batches score exactly what a plain padded pass scores, and
the per-class results are scikit-learn's on the same predictions."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_recall_fscore_support
from torch.utils.data import DataLoader, TensorDataset

from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import model_inputs, trainable_state
from server.round.evaluate import Evaluation, evaluate


@torch.no_grad()
def plain_pass(model, data, batch_size):
    """The reference: every example at the full padded width, in data order.
    (accuracy, loss, predicted labels)."""
    model.eval()
    correct, loss_sum, predicted = 0, 0.0, []
    for ids, mask, labels in DataLoader(data, batch_size=batch_size):
        logits = model(**model_inputs(ids, mask)).logits
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        predicted += logits.argmax(-1).tolist()
    model.train()
    return correct / len(data), loss_sum / len(data), predicted


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
    return model, data, labels


def test_cut_batches_match_the_padded_pass(model_and_test):
    model, data, _ = model_and_test
    lengths = data.tensors[1].sum(1)
    assert int(lengths.max()) < data.tensors[1].shape[1]  # there is padding to cut
    accuracy, loss, predicted = plain_pass(model, data, 16)
    got = evaluate(model, trainable_state(model), data, batch_size=16)
    assert got.accuracy == accuracy
    assert math.isclose(got.loss, loss, rel_tol=1e-5)
    # Scored longest first, reported in the data's order.
    assert list(got.predicted) == predicted and list(got.true) == data.tensors[2].tolist()
    assert model.training  # mode restored


def test_left_padding_is_not_cut(model_and_test):
    model, data, _ = model_and_test
    ids, mask, labels = data.tensors
    flipped = TensorDataset(ids.flip(1), mask.flip(1), labels)  # padding first: must not be cut away
    accuracy, loss, predicted = plain_pass(model, flipped, 16)
    got = evaluate(model, trainable_state(model), flipped, batch_size=16)
    assert (got.accuracy, got.loss, list(got.predicted)) == (accuracy, loss, predicted)  # same batches, same order


def test_per_class_block_is_sklearns_on_the_plain_pass_predictions(model_and_test):
    model, data, names = model_and_test
    true = data.tensors[2].tolist()
    _, _, predicted = plain_pass(model, data, 16)
    assert len(set(predicted)) > 1  # a model that predicts one class would test little
    block = evaluate(model, trainable_state(model), data, batch_size=16).block(names, 3)

    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=ids, zero_division=0)
    assert block["labels"] == list(names) and list(block["per_class"]) == list(names)
    for k, name in enumerate(names):
        assert block["per_class"][name] == pytest.approx(
            {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}, abs=1e-12
        )
    assert block["macro_f1"] == pytest.approx(f1_score(true, predicted, labels=ids, average="macro", zero_division=0))
    assert block["weighted_f1"] == pytest.approx(
        f1_score(true, predicted, labels=ids, average="weighted", zero_division=0)
    )
    assert block["round"] == 3 and block["num_examples"] == len(true)
    matrix = block["confusion_matrix"]
    assert [sum(row) for row in matrix] == [int(s) for s in support]
    assert sum(matrix[k][k] for k in ids) == round(block["accuracy"] * len(true))


def test_a_class_never_predicted_or_absent_is_still_reported_as_zero():
    # Four labels: "c" is never predicted, "d" neither in the test set nor predicted.
    true = torch.tensor([0, 0, 1, 2, 2])
    logits = F.one_hot(torch.tensor([0, 1, 1, 0, 1]), 4).float()
    result = Evaluation.of(logits, true, loss_sum=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division is explicit: sklearn must not warn
        block = result.block(["a", "b", "c", "d"], 1)
    assert list(block["per_class"]) == ["a", "b", "c", "d"]
    assert block["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert block["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert block["per_class"]["b"] == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1})
    # Macro F1 is the plain mean over every label of the run, the absent one included.
    assert result.macro_f1 == pytest.approx(sum(c["f1"] for c in block["per_class"].values()) / 4)
    assert block["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert (result.accuracy, result.loss) == (0.4, 1.0)
    with pytest.raises(ValueError, match="3 label names for a model with 4 outputs"):
        result.block(["a", "b", "c"], 1)
