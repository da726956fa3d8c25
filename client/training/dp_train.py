"""Local training, with or without DP-SGD: the one place a client touches its data.

DP-SGD is Opacus' (per-example clipping to C, Gaussian noise σ·C, Poisson sampling
at ``1 / ceil(n / batch_size)``, accounted at the q and step count Opacus really runs:
``common.privacy.accounting.sample_rate`` / ``steps_per_epoch``) with the fixes HF BERT needs (STACK.md):
contiguous position/token-type ids, empty Poisson batches taken as noise-only
steps, train mode.

Privacy caveats, stated plainly:
- The guarantee holds only for batches drawn by the Poisson loader built here;
  training on the same data through any other data loader invalidates it.
- Noise and sampling come from torch generators seeded from ``os.urandom`` (no
  CSPRNG: torchcsprng does not install). ``seed`` in the config never reaches them.
- The accountant history returned is the client's whole history (``prior_history``
  plus this call); the caller must persist it before releasing the model.
- ``max_physical_batch_size`` (a small GPU) splits each Poisson batch with Opacus'
  ``BatchMemoryManager``: the logical batch, the noise (added once per logical
  batch) and the accountant history are exactly those without it. Poisson sampling
  with BatchMemoryManager is the supported combination (two backward passes per
  Poisson step are not).
- ``amp_dtype`` (CUDA autocast) computes per-example gradients in bf16/fp16; see
  ``client.device`` for what that means for clipping.
- A non-finite value never reaches the noise: a feature row with an inf or NaN is zeroed
  before it is normalised or trained on, and so is an example's per-example gradient
  (hooks mode) before clipping; otherwise one example could turn its class's released sum,
  or the whole noised step, into NaN. Ghost clipping has no per-example gradients: there an
  example whose norm is not finite gets clipping coefficient 0 (``client.training.ghost``).
- Token classification (labels [N, L]): the example, and so the unit clipped, noised
  and accounted, is one sentence; its loss is the sum of its tokens' losses
  (:func:`sentence_loss`). One person's data spread over many sentences is protected
  only by group privacy, as many texts are for sequence classification.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.device import autocast
from client.privacy.ledger import RunCalibration
from client.training.ghost import LeanGhostCriterion
from common.data.conll import IGNORE, OUTSIDE_ID
from common.model.state import model_inputs
from common.privacy.accounting import (
    PROTOTYPE_SAMPLE_RATE,
    PROTOTYPE_SENSITIVITY,
    calibrate_noise,
    epsilon,
    make_accountant,
    prototype_entry,
    sample_rate,
    steps_per_epoch,
)
from common.privacy.randomness import urandom_generator

log = logging.getLogger(__name__)

# Expected here, and said once in the report instead of in every round's log:
# no CSPRNG exists for current torch, and frozen embeddings make BERT's first
# backward hook fire without input gradients.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float  # σ, noise std in units of max_grad_norm
    max_grad_norm: float  # C, per-example L2 clipping bound
    accountant: str  # "rdp" | "prv"
    prior_history: tuple  # the ledger's history before this call


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken (= Poisson batches drawn, empty ones included)
    empty_batches: int
    sample_rate: float  # q, per step
    history: list  # accountant history after training (None without DP)


@dataclass
class _Private:
    """What Opacus made of the model, optimizer and loader for one call (DP only)."""

    engine: object  # opacus.PrivacyEngine: its accountant holds the history
    hooks: object  # GradSampleModule hooks, removed after training
    optimizer: torch.optim.Optimizer  # DPOptimizer: clips, noises, counts steps
    loader: DataLoader  # Poisson sampling at q = batch_size / n
    criterion: object
    ghost: bool


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`local_train` trains, fixed once per round (``client.round``; the audit, once
    per run): one object, so that a round's call trains with the batch size and σ its budget
    check accounted. Fields as in :func:`local_train`'s docstring."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # train.optimizer: conf/train/default.yaml holds its default, not this class
    dp: DPSettings | None  # None: ordinary mini-batch steps, no guarantee at all
    weight_decay: float = 0.0
    device: str | torch.device = "cpu"
    max_physical_batch_size: int | None = None
    amp_dtype: torch.dtype | None = None
    shuffle_seed: int | None = None
    grad_sample_mode: str = "hooks"
    features: bool = False
    outside_weight: float = 1.0


def local_train(model: nn.Module, data: TensorDataset, settings: TrainSettings) -> TrainResult:
    """Train ``model``'s trainable parameters in place on ``data``.

    With ``settings.dp`` the steps are DP-SGD and the result carries the accountant history;
    without it they are ordinary mini-batch steps (no guarantee at all), shuffled
    with ``shuffle_seed`` when given so that non-private runs are reproducible.
    ``shuffle_seed`` is ignored under DP: its sampling must not be predictable.
    ``grad_sample_mode`` is Opacus' way to get per-example norms: ``hooks`` (per-example
    gradients; best for LoRA) or ``ghost`` (ghost clipping, a second backward pass and
    no per-example gradients; best for full fine-tuning). Both clip every example to C
    and add the same noise, so the accounting is identical.
    ``features``: ``data`` holds (pooled features, labels) and ``model`` is the head alone
    (the recipe's head stage, ``common.recipe``): the same Poisson loader, clipping, noise
    and accounting, on the head's parameters only.
    Labels of shape [N, L] (token classification) train on :func:`sentence_loss`, with
    ``outside_weight`` on O-tagged words; one sentence is one example.

    Three pieces, one per thing that varies: the DP engine (:func:`_make_private`), the
    loss of one batch (:func:`_batch_loss`), and the loop over (physical) batches
    (:func:`_run_steps`).
    """
    s = settings
    _check(s, data)
    if s.features:
        data = TensorDataset(finite_rows(data.tensors[0]), *data.tensors[1:])
    model.to(s.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(s.optimizer, params, lr=s.lr, weight_decay=s.weight_decay)
    seeded = s.dp is None and s.shuffle_seed is not None
    sampling_gen = torch.Generator().manual_seed(s.shuffle_seed) if seeded else urandom_generator()
    loader = DataLoader(data, batch_size=s.batch_size, shuffle=s.dp is None, generator=sampling_gen)
    private = _make_private(model, opt, loader, s.dp, s.grad_sample_mode, s.device) if s.dp is not None else None
    if private is not None:
        opt, loader = private.optimizer, private.loader
    criterion = _criterion(s, private, tokens=data.tensors[-1].dim() == 2)

    def batch_loss(batch) -> torch.Tensor:
        return _batch_loss(
            model,
            batch,
            criterion,
            device=s.device,
            amp_dtype=s.amp_dtype,
            features=s.features,
            accumulate=int(s.max_physical_batch_size) if s.dp is None and s.max_physical_batch_size else None,
        )

    stack = contextlib.ExitStack()
    # Without DP, dropout is seeded too, so a non-private run (and its resume) is
    # reproducible; with DP it keeps drawing from the process' unseeded generator.
    stack.enter_context(torch.random.fork_rng(devices=[]))
    if seeded:
        torch.manual_seed(s.shuffle_seed)
    if private is not None and s.max_physical_batch_size:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        loader = stack.enter_context(
            BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=int(s.max_physical_batch_size), optimizer=opt
            )
        )
    try:
        steps, empty = _run_steps(
            loader, opt, params, batch_loss, epochs=s.epochs, ghost=private is not None and private.ghost
        )
    finally:
        stack.close()
        if private is not None:
            _release_opacus(private, params)
    return TrainResult(
        steps=steps,
        empty_batches=empty,
        sample_rate=sample_rate(len(data), s.batch_size),
        history=list(private.engine.accountant.history) if private is not None else None,
    )


def _check(settings: TrainSettings, data: TensorDataset) -> None:
    """Refuse, before anything trains, the combinations Opacus or the loss cannot run."""
    if settings.grad_sample_mode not in ("hooks", "ghost"):
        raise ValueError(f"train.grad_sample_mode must be hooks or ghost, got {settings.grad_sample_mode!r}")
    ghost = settings.dp is not None and settings.grad_sample_mode == "ghost"
    if ghost and settings.max_physical_batch_size:
        # Opacus' BatchMemoryManager accumulates per-example gradients across physical
        # batches; ghost clipping has none to accumulate.
        raise ValueError("train.grad_sample_mode=ghost cannot be combined with max_physical_batch_size")
    if len(data) == 0:
        raise ValueError("no training data on this client")
    if ghost and data.tensors[-1].dim() == 2:
        raise ValueError(
            "train.grad_sample_mode=ghost takes one loss per example from Opacus' criterion; "
            "token classification sums each sentence's token losses here: use hooks"
        )


def _criterion(settings: TrainSettings, private: _Private | None, *, tokens: bool):
    """The loss of a batch: a sentence's summed token losses for tagged data, else cross-entropy
    (ghost mode: Opacus' wrapped criterion, which runs both backward passes)."""
    if tokens:

        def criterion(logits, labels):
            return sentence_loss(logits, labels, outside_weight=settings.outside_weight)

        return criterion
    return private.criterion if private is not None else F.cross_entropy


def _release_opacus(private: _Private, params: list) -> None:
    """Leave no Opacus hooks or per-example state behind: the model may be reused."""
    private.hooks.cleanup()
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DPSettings,
    grad_sample_mode: str,
    device,
) -> _Private:
    """Opacus around one call: Poisson sampling, per-example clipping to C, noise σC, and an
    accountant that continues the ledger's history (``dp.prior_history``)."""
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant = make_accountant(dp.accountant, dp.prior_history)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,  # its generator (from os.urandom) drives Poisson sampling
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=urandom_generator(device),
        grad_sample_mode=grad_sample_mode,
        criterion=nn.CrossEntropyLoss(),  # ghost mode: the wrapped criterion runs both backward passes
        wrap_model=False,  # state-dict keys stay free of "_module."
    )
    if grad_sample_mode == "ghost":
        hooks, optimizer, criterion, loader = private
        # Same norms, no wasted weight gradients.
        return _Private(engine, hooks, optimizer, loader, LeanGhostCriterion(criterion), True)
    hooks, optimizer, loader = private
    return _Private(engine, hooks, optimizer, loader, F.cross_entropy, False)


def _batch_loss(
    model: nn.Module, batch, criterion, *, device, amp_dtype, features: bool, accumulate: int | None
) -> torch.Tensor:
    """The loss of one non-empty batch, its backward pass done."""
    labels = batch[-1].to(device)
    if features:  # the head alone, on pooled features
        with autocast(torch.device(device), amp_dtype):
            loss = criterion(model(batch[0].to(device)).float(), labels)
    elif accumulate:  # non-DP with max_physical_batch_size: the batch in chunks
        return _accumulated_backward(
            model, batch[0].to(device), batch[1].to(device), labels, accumulate, device, amp_dtype, criterion
        )
    else:
        with autocast(torch.device(device), amp_dtype):
            logits = model(**model_inputs(batch[0].to(device), batch[1].to(device))).logits
            loss = criterion(logits.float(), labels)
    loss.backward()
    return loss


def _run_steps(loader, optimizer, params: list, batch_loss, *, epochs: int, ghost: bool) -> tuple[int, int]:
    """(steps, empty batches) over ``epochs`` passes of ``loader``; every Poisson batch is a step."""
    steps = empty = 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)  # under BatchMemoryManager: keeps the partial sum
            if len(batch[-1]) == 0:
                # An empty Poisson batch is still a step of the mechanism: its noise must be
                # added and the accountant must count it. BERT cannot run on batch 0, so give
                # Opacus empty per-example grads (ghost mode: a zero clipped sum).
                for p in params:
                    if ghost:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
                steps += 1
                empty += 1
                continue
            batch_loss(batch)
            _zero_nonfinite_examples(params)
            optimizer.step()
            # A physical batch that is not the last of its Poisson batch only clips and
            # accumulates: it is no step of the mechanism.
            if not getattr(optimizer, "_is_last_step_skipped", False):
                steps += 1
    return steps, empty


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every row that holds a non-finite value set to zeros (a copy when any is)."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(bad.any()):
        return x
    x = x.clone()
    x[bad] = 0
    return x


def _zero_nonfinite_examples(params: list) -> None:
    """Zero, in every parameter, the per-example gradients of an example that has a
    non-finite one anywhere, before Opacus clips them (its clipping would give NaN)."""
    samples = [p.grad_sample for p in params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
    if not samples or samples[0].dim() == 0:
        return
    finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
    for gs in samples:
        finite &= torch.isfinite(gs.reshape(len(gs), -1)).all(dim=1)
    if not bool(finite.all()):
        for gs in samples:
            gs[~finite] = 0


def _accumulated_backward(model, input_ids, attention_mask, labels, chunk: int, device, amp_dtype, criterion):
    """Non-DP: the gradient of the batch's mean per-example loss, ``chunk`` examples at a time
    (``criterion`` averages over the examples it is given)."""
    total = 0.0
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        with autocast(torch.device(device), amp_dtype):
            logits = model(**model_inputs(input_ids[sl], attention_mask[sl])).logits
            loss = criterion(logits.float(), labels[sl]) * len(labels[sl]) / len(labels)
        loss.backward()
        total += float(loss.detach())
    return torch.tensor(total)


def sentence_loss(logits: torch.Tensor, labels: torch.Tensor, *, outside_weight: float = 1.0) -> torch.Tensor:
    """The mean over the batch's sentences of each sentence's summed token cross-entropy.

    ``logits`` [B, L, K], ``labels`` [B, L] (-100: not scored); O-tagged words weigh
    ``outside_weight``. Opacus scales a mean loss by the batch size before clipping, so each
    sentence's per-example gradient is that of its own summed token loss: the unit clipped to
    C is one sentence, however many words it has.
    """
    flat = labels.reshape(-1)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE, reduction="none"
    )
    weights = torch.where(flat == OUTSIDE_ID, float(outside_weight), 1.0).to(per_token.dtype)
    return (per_token * weights).sum() / max(labels.shape[0], 1)


def _optimizer(name: str, params: list, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Adam on DP gradients is post-processing of the noised gradient: no extra cost.
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def planned_steps_per_round(n: int, batch_size: int, epochs: int) -> int:
    """Steps one round takes on ``n`` examples: what σ is calibrated for, and what Opacus runs."""
    return epochs * steps_per_epoch(n, batch_size)


def calibrate_run(
    sample: Mapping,
    *,
    n: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    prior_history=(),
    prototype_share: float | None = None,
) -> RunCalibration:
    """σ for a whole run, fixed once, so that the planned run spends ``privacy.sample.epsilon``
    on top of ``prior_history`` (the ledger's spend). ``sample`` is the ``privacy.sample``
    config; ``rounds`` counts the run's DP-SGD rounds (head and encoder stages).

    With ``prototype_share`` (the recipe's prototype round) the release's σ_p comes first:
    the release alone would take the prior spend to ε_prior + share × (ε − ε_prior). Then
    DP-SGD's σ is calibrated on top of the prior spend *and* that release, over every
    planned step (``rounds × local_epochs`` epochs of Poisson batches over ``n``), so that
    the whole planned run — release and steps, composed in one RDP/PRV history — reaches
    the budget. A run with no DP-SGD round (``rounds`` 0: the release alone, e.g.
    ``rounds=1``) gives the release the whole budget: a share would leave the rest unspent.
    The one place a run's σ is decided (client rounds, the audit, the
    benchmarks' loop); a σ is None when the spend before it already reaches the budget.
    """
    q = sample_rate(n, batch_size)
    steps = planned_steps_per_round(n, batch_size, local_epochs)
    planned = steps * rounds
    target, delta, accountant = float(sample["epsilon"]), float(sample["delta"]), sample["accountant"]
    prior = list(prior_history)
    sigma_p = None
    if prototype_share is not None:
        spent = epsilon(prior, delta, accountant) if prior else 0.0
        share = float(prototype_share) if planned > 0 else 1.0
        sigma_p = calibrate_noise(
            target_epsilon=spent + share * (target - spent),
            delta=delta,
            sample_rate=PROTOTYPE_SAMPLE_RATE,
            steps=1,
            prior_history=prior,
            accountant=accountant,
        )
        if sigma_p is None:
            return RunCalibration(None, q, steps, planned, None)
        prior = [*prior, prototype_entry(sigma_p)]
    sigma = None
    if planned > 0:
        sigma = calibrate_noise(
            target_epsilon=target, delta=delta, sample_rate=q, steps=planned, prior_history=prior, accountant=accountant
        )
    return RunCalibration(sigma, q, steps, planned, sigma_p)


def release_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, sigma: float | None
) -> torch.Tensor:
    """The client's prototype release: per-class sums of unit-norm features, noised.

    A row with a non-finite value is zeroed (it adds nothing). Each feature row is
    L2-normalised here (whatever ``model.normalize`` says), so one
    example moves one class's sum by at most norm 1: sensitivity
    ``common.privacy.accounting.PROTOTYPE_SENSITIVITY``. N(0, σ²) goes on every entry of all
    ``num_labels`` sums, classes this client does not hold included, and no per-class count
    is released: otherwise which classes a client holds would leak. ``sigma`` None: no
    noise (privacy none or client-level DP only; the report then claims no sample-level
    guarantee). Noise comes from ``os.urandom`` (as DP-SGD's).
    """
    unit = F.normalize(finite_rows(features.to(torch.float64)), p=2, dim=1)
    sums = torch.zeros(int(num_labels), unit.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.to(torch.long), unit)
    if sigma is not None:
        noise = torch.normal(
            0.0,
            float(sigma) * PROTOTYPE_SENSITIVITY,
            size=sums.shape,
            generator=urandom_generator(),
            dtype=torch.float64,
        )
        sums = sums + noise
    return sums.to(torch.float32)
