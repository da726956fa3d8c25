"""The audit's white-box scoring on a tiny model: directions and what one step releases."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.audit import canary_directions, flat_trainable
from client.dp_train import DPSettings, local_train
from common.audit import joint_scores
from common.model import model_inputs
from tests.client.test_dp_train import tiny_data, tiny_model

LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"])


def reference_directions(model, data):
    """Unit descent directions by one backward per example, dropout off."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for ids, mask, label in zip(*data.tensors):
        logits = model(**model_inputs(ids[None], mask[None])).logits
        g = -torch.cat([x.reshape(-1) for x in torch.autograd.grad(F.cross_entropy(logits, label[None]), params)])
        rows.append(g / g.norm())
    return torch.stack(rows)


def test_directions_match_per_example_autograd_and_leave_the_model_clean():
    model = tiny_model(lora=LORA, hidden_dropout_prob=0.3)  # dropout must not reach the directions
    data = tiny_data(7)
    reference = reference_directions(copy.deepcopy(model), data)
    model.train()
    got = canary_directions(model, data, chunk=3)  # chunks of unequal size
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())
    for p in model.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None
        assert not hasattr(p, "_current_grad_sample")
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_one_step_without_noise_separates_included_canaries_exactly(clip):
    # q = 1 and one SGD step: the released update is -lr/B times the sum of the clipped
    # gradients at the start, so the joint fit on all examples' directions gives every
    # included canary a positive coefficient and every excluded one about zero.
    model = tiny_model(lora=LORA)
    canaries, real = tiny_data(12, seed=1), tiny_data(4, seed=2)
    included = torch.tensor([i % 2 == 0 for i in range(12)])
    data = TensorDataset(*(torch.cat([r, c[included]]) for r, c in zip(real.tensors, canaries.tensors)))
    known = TensorDataset(*(torch.cat([c, r]) for c, r in zip(canaries.tensors, real.tensors)))
    directions = canary_directions(model, known)
    start = flat_trainable(model)
    local_train(model, data, epochs=1, batch_size=len(data), lr=0.1, optimizer="sgd",
                dp=DPSettings(0.0, clip, "rdp", ()))
    scores = joint_scores(directions, flat_trainable(model) - start, ridge=1e-9)[:12]
    assert scores[~included].abs().max() < 0.05 * scores[included].min()
