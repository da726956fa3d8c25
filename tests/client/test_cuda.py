"""The DP step on a real GPU: fp32 and bf16 autocast, hooks and ghost, BatchMemoryManager.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with
`pytest tests/client/test_cuda.py`. The references are the CPU ones of test_dp_train.
"""

import copy

import pytest
import torch

from client.training.dp_train import DPSettings, TrainSettings, local_train
from common.model.state import trainable_state
from common.privacy.accounting import epsilon
from common.privacy.mechanism import clip_update
from tests.client.test_dp_train import reference_clipped_mean, tiny_data, tiny_model
from tests.conftest import one_dp_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def full_batch_update(model, data, *, sigma, clip, mode="hooks", amp=None, physical=None):
    before = trainable_state(model)
    result = local_train(
        model,
        data,
        one_dp_step(
            data,
            sigma=sigma,
            clip=clip,
            device=CUDA,
            grad_sample_mode=mode,
            amp_dtype=amp,
            max_physical_batch_size=physical,
        ),
    )
    assert result.steps == 1 and result.history == [(sigma, 1.0, 1)]
    after = trainable_state(model)
    return {k: after[k].cpu() - before[k].cpu() for k in before}


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_fp32_clipping_on_cuda_matches_the_cpu_reference(mode):
    data, clip = tiny_data(6), 0.05
    model = tiny_model()
    reference, norms = reference_clipped_mean(copy.deepcopy(model), data, clip)
    assert max(norms) > clip
    update = full_batch_update(model, data, sigma=0.0, clip=clip, mode=mode)
    for name in reference:
        torch.testing.assert_close(update[name], -reference[name], rtol=1e-3, atol=1e-6)


def test_bf16_autocast_clips_within_its_rounding():
    # device.py's caveat: per-example norms in bf16 carry ~2^-8 relative error, no more.
    data, clip = tiny_data(6), 0.05
    model = tiny_model()
    reference, _ = reference_clipped_mean(copy.deepcopy(model), data, clip)
    update = full_batch_update(model, data, sigma=0.0, clip=clip, amp=torch.bfloat16)
    step = torch.sqrt(sum((u.double() ** 2).sum() for u in update.values()))
    assert step <= clip * (1 + 2**-6)
    ref = torch.cat([-reference[k].flatten() for k in reference])
    got = torch.cat([update[k].flatten() for k in reference])
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=0)
    assert cos > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_noise_on_cuda_has_std_sigma_c_over_b_and_differs_between_runs():
    data = tiny_data(8)
    sigma, clip = 1.5, 0.5
    base = tiny_model(hidden_size=64, intermediate_size=128)
    quiet = full_batch_update(copy.deepcopy(base), data, sigma=0.0, clip=clip)
    a = full_batch_update(copy.deepcopy(base), data, sigma=sigma, clip=clip)
    b = full_batch_update(copy.deepcopy(base), data, sigma=sigma, clip=clip)
    noise = torch.cat([(a[k] - quiet[k]).flatten() for k in quiet])
    assert float(noise.std()) == pytest.approx(sigma * clip / len(data), rel=0.05)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_batch_memory_manager_on_cuda_keeps_the_logical_step():
    # Physical batches of 2 inside a logical (Poisson) batch of the whole set: the same
    # clipped mean, one step of the mechanism.
    data, clip = tiny_data(8), 0.05
    model = tiny_model()
    reference, _ = reference_clipped_mean(copy.deepcopy(model), data, clip)
    # q = 1 means every example is sampled; BatchMemoryManager splits them 2 by 2.
    update = full_batch_update(model, data, sigma=0.0, clip=clip, physical=2)
    for name in reference:
        torch.testing.assert_close(update[name], -reference[name], rtol=1e-3, atol=1e-6)


def test_lora_under_dp_on_cuda_changes_adapters_only_and_counts_every_step():
    model = tiny_model(lora=dict(r=2, alpha=4, dropout=0.0, target_modules=["query", "value"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    result = local_train(
        model,
        tiny_data(32),
        TrainSettings(
            epochs=2,
            batch_size=8,
            lr=0.01,
            optimizer="sgd",
            dp=DPSettings(0.8, 1.0, "rdp", ()),
            device=CUDA,
            amp_dtype=torch.bfloat16,
        ),
    )
    assert result.history == [(0.8, 0.25, 8)] and result.steps == 8
    assert 0 < epsilon(result.history, 1e-5) < float("inf")
    after = trainable_state(model)
    assert all(not torch.equal(after[k].cpu(), before[k].cpu()) for k in before)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.cpu(), frozen[name].cpu()), f"frozen {name} changed"


def test_clip_update_of_bf16_cuda_tensors_stays_within_c():
    gen = torch.Generator(device="cuda").manual_seed(1)
    update = {
        "a": torch.randn(300, 64, device=CUDA, generator=gen).bfloat16(),
        "b": torch.randn(64, device=CUDA, generator=gen).bfloat16(),
    }
    out = clip_update(update, 0.5)
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in out.update.values()))
    assert float(norm) <= 0.5 and not out.fits
