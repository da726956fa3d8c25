"""DP-SGD for token classification against independent references (no Opacus in them).

The unit is one sentence: its gradient is that of its summed (O-weighted) token loss,
clipped to C as a whole. The head stage's packed word features must give the head
exactly what a full forward pass gives it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.training.dp_train import DPSettings, TrainSettings, local_train, sentence_loss
from common.data.features import token_features
from common.model.factory import build_model
from common.model.pooling import TokenClassifier
from common.model.state import model_inputs, trainable_state
from tests.conftest import model_group, one_dp_step

TINY = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # no dropout: deterministic reference
TAGS = 5  # O, B-a, I-a, B-b, I-b


def token_model(*, freeze_encoder=False, layer=-1):
    return build_model(
        **{
            **model_group("tiny_bert"),
            "config_overrides": TINY,
            "freeze_encoder": freeze_encoder,
            "token_layer": layer,
            "lora": None,
        },
        num_labels=TAGS,
        seed=0,
        task="token_classification",
    )


def tagged_data(n, length=10, seed=0):
    """Sentences of different lengths; some subwords unlabelled (-100), as alignment leaves them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    labels = torch.randint(0, TAGS, (n, length), generator=g)
    labels[labels == 2] = 0  # plenty of O words, so the outside weight matters
    for i in range(n):
        used = 3 + i % (length - 3)
        mask[i, used:] = 0
        labels[i, used:] = -100
        labels[i, 0] = -100  # [CLS]
        labels[i, 2] = -100  # a word's second subword
    return TensorDataset(ids, mask, labels)


def step(model, data, *, clip, weight, sigma=0.0):
    """One DP-SGD step (SGD, lr 1) on the whole dataset as one batch (q = 1)."""
    before = trainable_state(model)
    result = local_train(
        model,
        data,
        one_dp_step(data, sigma=sigma, clip=clip, outside_weight=weight),
    )
    assert result.steps == 1
    after = trainable_state(model)
    return {k: after[k] - before[k] for k in before}


def reference(model, data, *, clip, weight):
    """One backward per sentence of its summed weighted token loss, clipped, averaged."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for ids, mask, labels in zip(*data.tensors):
        model.zero_grad(set_to_none=True)
        logits = model(**model_inputs(ids[None], mask[None])).logits[0]
        loss = sum(
            (weight if int(y) == 0 else 1.0) * F.cross_entropy(logits[t], y)
            for t, y in enumerate(labels)
            if int(y) != -100
        )
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads.values())))
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))
        for n in total:
            total[n] += factor * grads[n]
    model.zero_grad(set_to_none=True)
    return {n: t / len(data) for n, t in total.items()}, norms


@pytest.mark.parametrize("clip,weight", [(0.05, 1.0), (0.05, 0.3), (1e6, 0.3)])
def test_per_sentence_clipping_matches_one_backward_per_sentence(clip, weight):
    data = tagged_data(6)
    model = token_model()
    expected, norms = reference(copy.deepcopy(model), data, clip=clip, weight=weight)
    if clip < 1:
        assert min(norms) > clip, "every sentence must be clipped"
    update = step(model, data, clip=clip, weight=weight)
    assert set(update) == set(expected)
    for name in expected:
        torch.testing.assert_close(update[name], -expected[name], rtol=1e-4, atol=1e-7)


def test_a_sentence_counts_once_however_many_words():
    # Summed, not averaged, over a sentence's words: doubling every token's loss doubles
    # the unclipped gradient; clipped, each sentence still moves the model by at most C.
    logits = torch.randn(2, 4, TAGS, requires_grad=True)
    labels = torch.tensor([[1, 0, -100, -100], [3, 4, 0, 0]])
    loss = sentence_loss(logits, labels)
    by_hand = (
        F.cross_entropy(logits[0, :2], labels[0, :2], reduction="sum")
        + F.cross_entropy(logits[1], labels[1], reduction="sum")
    ) / 2
    torch.testing.assert_close(loss, by_hand)
    data = tagged_data(4)
    update = step(token_model(), data, clip=0.01, weight=1.0)
    assert torch.sqrt(sum((u**2).sum() for u in update.values())) <= 0.01 + 1e-6


def test_noise_is_sigma_times_clip_over_batch_on_every_head_weight():
    data = tagged_data(8)
    base = token_model(freeze_encoder=True)
    quiet = step(copy.deepcopy(base), data, clip=0.5, weight=1.0)
    noisy = step(copy.deepcopy(base), data, clip=0.5, weight=1.0, sigma=2.0)
    noise = torch.cat([(noisy[k] - quiet[k]).flatten() for k in quiet])
    assert set(quiet) == {"classifier.weight", "classifier.bias"}
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / len(data), rel=0.25)


def test_head_stage_on_packed_features_equals_a_full_forward():
    # The recipe's head stage trains the head on cached word features; a DP step there must
    # equal the same step through the frozen encoder, example for example.
    data = tagged_data(6)
    model = token_model(freeze_encoder=True, layer=-2)
    full = step(copy.deepcopy(model), data, clip=0.05, weight=0.3)
    feats = token_features(model, data)
    assert feats.tensors[0].shape[:2] == feats.tensors[1].shape
    assert int(feats.tensors[1].ne(-100).sum()) == int(data.tensors[2].ne(-100).sum())
    head = copy.deepcopy(model).classifier
    before = {k: v.detach().clone() for k, v in head.named_parameters()}
    local_train(
        head,
        feats,
        TrainSettings(
            epochs=1,
            batch_size=len(feats),
            lr=1.0,
            optimizer="sgd",
            dp=DPSettings(0.0, 0.05, "rdp", ()),
            features=True,
            outside_weight=0.3,
        ),
    )
    for name, value in head.named_parameters():
        torch.testing.assert_close(value.detach() - before[name], full[f"classifier.{name}"], rtol=1e-4, atol=1e-7)


def test_token_layer_cuts_the_encoder_and_counts_from_the_end():
    model = token_model(layer=-2)
    assert isinstance(model, TokenClassifier)
    assert len(model.backbone.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    ids = torch.randint(1000, 5000, (2, 7))
    out = model(**model_inputs(ids, torch.ones_like(ids))).logits
    assert out.shape == (2, 7, TAGS)
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="model.token_layer"):
        token_model(layer=-3)


def test_ghost_clipping_is_refused_for_tokens():
    with pytest.raises(ValueError, match="grad_sample_mode"):
        local_train(
            token_model(),
            tagged_data(4),
            TrainSettings(
                epochs=1,
                batch_size=4,
                lr=1.0,
                optimizer="sgd",
                dp=DPSettings(1.0, 1.0, "rdp", ()),
                grad_sample_mode="ghost",
            ),
        )
