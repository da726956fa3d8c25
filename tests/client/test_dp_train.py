"""The DP training step against independent references (no Opacus in the reference)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.training.dp_train import DPSettings, TrainSettings, local_train
from common.model.factory import build_model
from common.model.state import model_inputs, trainable_state
from common.privacy.accounting import epsilon
from tests.conftest import model_group, one_dp_step

TINY = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # no dropout: deterministic reference


def tiny_model(lora=None, num_labels=3, **overrides):
    """conf/model/tiny_bert.yaml through HF's pooler (BertForSequenceClassification), a smaller body."""
    return build_model(
        **{
            **model_group("tiny_bert"),
            "pooling": "pooler",
            "normalize": None,
            "freeze_encoder": False,
            "config_overrides": {**TINY, **overrides},
            "lora": lora,
        },
        num_labels=num_labels,
        seed=0,
    )


def tiny_data(n, length=12, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 3 :] = 0  # some padding, as real batches have
    return TensorDataset(ids, mask, torch.randint(0, num_labels, (n,), generator=g))


def one_full_batch_update(model, data, *, sigma, clip, mode="hooks"):
    """One DP-SGD step (SGD, lr 1) on a batch that is the whole dataset (q = 1)."""
    before = trainable_state(model)
    result = local_train(
        model,
        data,
        one_dp_step(data, sigma=sigma, clip=clip, grad_sample_mode=mode),
    )
    assert result.steps == 1 and result.sample_rate == 1.0
    after = trainable_state(model)
    return {k: after[k] - before[k] for k in before}


def reference_clipped_mean(model, data, clip):
    """Per-example gradients by one backward per example, clipped to ``clip``, averaged."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for ids, mask, label in zip(*data.tensors):
        model.zero_grad(set_to_none=True)
        logits = model(**model_inputs(ids[None], mask[None])).logits
        F.cross_entropy(logits, label[None]).backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n in total:
            total[n] += factor * grads[n]
    model.zero_grad(set_to_none=True)
    return {n: t / len(data) for n, t in total.items()}, norms


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_clipping_matches_independent_per_example_reference(mode):
    # Ghost clipping (train.grad_sample_mode=ghost) must clip exactly as per-example hooks do.
    data = tiny_data(6)
    clip = 0.05
    model = tiny_model()
    reference, norms = reference_clipped_mean(copy.deepcopy(model), data, clip)
    assert max(norms) > clip, "the test must exercise clipping"
    update = one_full_batch_update(model, data, sigma=0.0, clip=clip, mode=mode)
    for name in reference:
        torch.testing.assert_close(update[name], -reference[name], rtol=1e-4, atol=1e-7)
    # Each example contributes at most C, so the averaged step is at most C.
    step_norm = torch.sqrt(sum((u**2).sum() for u in update.values()))
    assert step_norm <= clip + 1e-6


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_std_is_sigma_times_clip_over_batch(mode):
    data = tiny_data(8)
    sigma, clip = 1.5, 0.5
    base = tiny_model(hidden_size=64, intermediate_size=128)
    quiet = one_full_batch_update(copy.deepcopy(base), data, sigma=0.0, clip=clip, mode=mode)
    noisy = one_full_batch_update(copy.deepcopy(base), data, sigma=sigma, clip=clip, mode=mode)
    noise = torch.cat([(noisy[k] - quiet[k]).flatten() for k in quiet])
    assert noise.numel() > 10_000
    expected = sigma * clip / len(data)
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * expected


def test_two_runs_draw_different_noise():
    # Noise comes from os.urandom, never from the config seed.
    data = tiny_data(8)
    base = tiny_model()
    a = one_full_batch_update(copy.deepcopy(base), data, sigma=1.0, clip=0.5)
    b = one_full_batch_update(copy.deepcopy(base), data, sigma=1.0, clip=0.5)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_lora_adapters_and_head_change_under_dp_and_nothing_else():
    # opacus#820: PEFT + Opacus once trained silently broken models.
    model = tiny_model(lora=dict(r=2, alpha=4, dropout=0.0, target_modules=["query", "value"]))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = trainable_state(model)
    assert any("lora_A" in k for k in trainable_before) and any("lora_B" in k for k in trainable_before)
    assert any("classifier" in k for k in trainable_before)
    local_train(
        model,
        tiny_data(32),
        TrainSettings(epochs=2, batch_size=8, lr=0.01, optimizer="adamw", dp=DPSettings(0.8, 1.0, "rdp", ())),
    )
    after = trainable_state(model)
    for name, before in trainable_before.items():
        assert not torch.equal(after[name], before), f"{name} did not change under DP"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_noise_only_steps(mode):
    data = tiny_data(20)
    model = tiny_model()
    before = trainable_state(model)
    # q = 1/20: a batch is empty with probability 0.95^20 = 36 %.
    result = local_train(
        model,
        data,
        TrainSettings(
            epochs=4, batch_size=1, lr=0.01, optimizer="sgd", dp=DPSettings(1.0, 1.0, "rdp", ()), grad_sample_mode=mode
        ),
    )
    assert result.steps == 80 and result.empty_batches > 0
    assert result.history == [(1.0, 0.05, 80)]  # every step counted, empty ones too
    assert not any(torch.equal(trainable_state(model)[k], before[k]) for k in before)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # no Opacus state left


def test_history_continues_from_prior():
    model = tiny_model()
    prior = ((1.0, 0.25, 8),)
    result = local_train(
        model,
        tiny_data(16),
        TrainSettings(epochs=1, batch_size=4, lr=0.01, optimizer="adamw", dp=DPSettings(1.0, 1.0, "rdp", prior)),
    )
    assert result.history == [(1.0, 0.25, 12)]
    assert epsilon(result.history, 1e-5) > epsilon(prior, 1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_model_is_reusable_after_dp_training(mode):
    # The client keeps a model per process; a second DP round must not hit Opacus' re-wrap failure.
    model = tiny_model()
    for _ in range(2):
        local_train(
            model,
            tiny_data(16),
            TrainSettings(
                epochs=1,
                batch_size=4,
                lr=0.01,
                optimizer="adamw",
                dp=DPSettings(1.0, 1.0, "rdp", ()),
                grad_sample_mode=mode,
            ),
        )


# --------------------------------------------------------------------------- client level


@pytest.mark.parametrize("scale", [1e-4, 0.3, 1.0, 7.0, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_clip_update_bounds_the_norm_and_keeps_the_direction(scale, dtype):
    from common.privacy.mechanism import clip_update

    gen = torch.Generator().manual_seed(3)
    update = {
        "a": (torch.randn(50, 7, generator=gen) * scale).to(dtype),
        "b": (torch.randn(7, generator=gen) * scale).to(dtype),
    }
    out = clip_update(update, 0.5)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in out.update.values()))
    assert norm <= 0.5
    before = math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))
    assert out.fits == (before <= 0.5)
    ratio = out.update["a"].double() / update["a"].double()
    assert float(ratio.max() - ratio.min()) < 1e-2  # one scale for every coordinate
    assert all(v.dtype == dtype for v in out.update.values())


def test_secure_vector_checks_the_update_before_masking():
    from client.secagg import secure_vector

    glob = {"a": torch.zeros(3), "b": torch.zeros(2)}
    ok = {"a": torch.full((3,), 0.1), "b": torch.zeros(2)}
    vec = secure_vector(ok, glob, ["a", "b"], fits=True, clipping_range=0.5, max_norm=0.5)
    assert [v.shape for v in vec] == [(3,), (2,), (1,)] and vec[-1][0] == 0.5
    assert all(
        (v == 0).all() for v in secure_vector(None, glob, ["a", "b"], fits=False, clipping_range=0.5, max_norm=0.5)
    )  # declined: zeros
    for bad in (
        {"a": torch.ones(3), "b": torch.zeros(2)},  # above C
        {"a": torch.tensor([float("nan"), 0, 0]), "b": torch.zeros(2)},
        {"a": torch.zeros(4), "b": torch.zeros(2)},
    ):
        with pytest.raises(ValueError):
            secure_vector(bad, glob, ["a", "b"], fits=True, clipping_range=0.5, max_norm=0.5)


def test_a_non_finite_feature_row_adds_nothing_to_the_prototype_release():
    """One inf row: its class's released sum is that of the other rows (no noise: exact)."""
    from client.training.dp_train import release_prototypes

    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    bad = feats.clone()
    bad[0, 1] = math.inf
    bad[2, 0] = math.nan
    released = release_prototypes(bad, labels, 3, None)
    keep = torch.tensor([False, True, False, True, True, True])
    expected = release_prototypes(feats[keep], labels[keep], 3, None)
    assert torch.isfinite(released).all()
    assert torch.allclose(released, expected)
    assert torch.isfinite(release_prototypes(bad, labels, 3, 0.5)).all()  # with noise too


def test_a_non_finite_example_never_turns_the_noised_step_into_nan():
    """Head training on features: the update stays finite, within the clipped-and-noised law."""
    feats = F.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    feats[3] = math.inf
    data = TensorDataset(feats, torch.arange(32) % 3)
    head = torch.nn.Linear(8, 3)
    before = trainable_state(head)
    result = local_train(
        head,
        data,
        TrainSettings(
            epochs=1, batch_size=32, lr=0.1, optimizer="sgd", features=True, dp=DPSettings(1.0, 1.0, "rdp", ())
        ),
    )
    after = trainable_state(head)
    assert result.steps >= 1
    assert all(torch.isfinite(after[k]).all() and not torch.equal(after[k], before[k]) for k in after)
