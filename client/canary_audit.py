"""`fedpriv audit`: an empirical privacy audit of one client's DP training, in one run.

Canaries, each included with probability 1/2 among held-out examples the size of the
audited client's data (no client's data, no ledger entry), go through the client's whole
run of DP-SGD; each round's released update scores them, and the right guesses bound ε
from below (common/privacy/audit_bounds.py). What the audit does, why the bound is valid
and what bounds its power: docs/audit.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.training.dp_train import DPSettings, TrainSettings, calibrate_run, local_train
from common.data.partition import load_client_data
from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import model_inputs
from common.privacy.accounting import epsilon, sample_rate, train_batch_size
from common.privacy.audit_bounds import audit, joint_scores, verdict


def make_canaries(
    m: int, *, length: int, num_labels: int, vocab_size: int, cls_id: int, sep_id: int, rng: random.Random
) -> TensorDataset:
    """``m`` canaries: [CLS] + random tokens + [SEP], each with a random label."""
    body = max(length - 2, 1)
    ids = torch.tensor(
        [[cls_id, *(rng.randrange(1000, vocab_size) for _ in range(body)), sep_id] for _ in range(m)], dtype=torch.long
    )[:, :length]
    mask = torch.ones_like(ids)
    labels = torch.tensor([rng.randrange(num_labels) for _ in range(m)], dtype=torch.long)
    return TensorDataset(ids, mask, labels)


def canary_directions(model: torch.nn.Module, canaries: TensorDataset, chunk: int = 64) -> torch.Tensor:
    """[m, D]: each canary's unit descent direction over the trainable weights, at the current θ.

    Per-example gradients from Opacus' hooks (the ones DP-SGD uses), ``chunk`` canaries
    a forward pass, with dropout off (the direction of the canary itself). Opacus'
    hooks record only modules in train mode, so only the dropout layers go to eval.
    """
    from opacus.grad_sample import GradSampleHooks

    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    hooks = GradSampleHooks(model, loss_reduction="sum")
    rows = []
    try:
        for start in range(0, len(canaries), chunk):
            ids, mask, labels = (t[start : start + chunk] for t in canaries.tensors)
            logits = model(**model_inputs(ids, mask)).logits
            F.cross_entropy(logits, labels, reduction="sum").backward()
            g = -torch.cat([p.grad_sample.reshape(len(labels), -1) for p in params], dim=1)
            rows.append(g / g.norm(dim=1, keepdim=True).clamp_min(1e-12))
            for p in params:
                p.grad_sample = None
                p.grad = None
    finally:
        hooks.cleanup()
        for p in params:
            p.grad = None
        model.train(was_training)
    return torch.cat(rows)


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


REAL_DATA = (
    "held-out test split (no client trains on it; no ledger entry), as many examples as the audited client holds"
)


def real_examples(cfg: Mapping, client: int):
    """(examples, label names): ``len(client's partition)`` examples of the held-out test split.

    A seeded shuffle picks them (fixed before the inclusion bits are drawn); a test split
    smaller than the partition is used whole. Only the partition's size is read.
    """
    n = len(load_client_data(cfg, client)[0])
    _, test, names = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    return test.shuffle(seed=int(cfg["seed"])).select(range(min(n, len(test)))), names


def run_audit(
    cfg: Mapping,
    *,
    canaries: int,
    guesses: int,
    client: int,
    noise: bool,
    confidence: float,
    canary_length: int = 12,
    ridge: float = 1e-4,
) -> dict[str, Any]:
    """Canaries + held-out examples the size of client ``client``'s data: train once (round by
    round), score, bound ε."""
    if guesses > canaries or guesses < 2:
        raise ValueError("need 2 <= guesses <= canaries")
    train = cfg["train"]
    sample = cfg["privacy"]["sample"]
    rng = random.SystemRandom()  # inclusion bits and canaries: not predictable from the config
    real, canary_set, num_labels = _examples(cfg, client, canaries, canary_length, rng)
    included = [rng.random() < 0.5 for _ in range(canaries)]
    idx = torch.tensor([i for i, inc in enumerate(included) if inc], dtype=torch.long)
    inserted = TensorDataset(*(t[idx] for t in canary_set.tensors))
    data = TensorDataset(*(torch.cat([a, b]) for a, b in zip(real.tensors, inserted.tensors)))

    n = len(data)
    batch_size = train_batch_size(train, n)
    rounds, local_epochs = int(cfg["rounds"]), int(train["local_epochs"])
    sigma = (
        calibrate_run(sample, n=n, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds).noise_multiplier
        if noise
        else 0.0
    )
    delta, clip, accountant = float(sample["delta"]), float(sample["max_grad_norm"]), sample["accountant"]
    settings = TrainSettings(
        epochs=local_epochs,
        batch_size=batch_size,
        lr=float(train["lr"]),
        weight_decay=float(train["weight_decay"]),
        optimizer=str(train["optimizer"]),
        dp=DPSettings(sigma, clip, accountant, ()),  # each round: the history so far
        grad_sample_mode=str(train["grad_sample_mode"]),
    )
    # The real examples were fixed before the inclusion bits were drawn: fitting their
    # directions too takes their share of the update out of the canaries' scores.
    known = TensorDataset(*(torch.cat([a, b]) for a, b in zip(canary_set.tensors, real.tensors)))
    scores, history = _train_and_score(
        instantiate_model(cfg, num_labels), data, known, settings, rounds=rounds, canaries=canaries, ridge=ridge
    )
    found = audit(
        scores, included, k_plus=guesses // 2, k_minus=guesses - guesses // 2, delta=delta, confidence=confidence
    )
    accounted = epsilon(history, delta, accountant) if sigma > 0 else math.inf
    power = found.max_detectable_epsilon
    return {
        "client": client,
        "canaries": canaries,
        "canaries_included": len(idx),
        "real_examples": len(real),
        "real_data": REAL_DATA,
        "guesses": found.guesses,
        "correct": found.correct,
        "confidence": confidence,
        "delta": delta,
        "epsilon_lower_bound": found.epsilon_lower_bound,
        "epsilon_accounted": accounted,
        "max_detectable_epsilon": power,
        "verdict": verdict(found.epsilon_lower_bound, power, accounted),
        "noise": noise,
        "noise_multiplier": sigma,
        "max_grad_norm": clip,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "steps": sum(int(h[2]) for h in history),  # the accountant counted every step
        "sample_rate": sample_rate(n, batch_size),
        "mean_score_included": sum(s for s, i in zip(scores, included) if i) / max(len(idx), 1),
        "mean_score_excluded": sum(s for s, i in zip(scores, included) if not i) / max(canaries - len(idx), 1),
    }


def _examples(
    cfg: Mapping, client: int, canaries: int, canary_length: int, rng: random.Random
) -> tuple[TensorDataset, TensorDataset, int]:
    """(the real examples, tokenised; ``canaries`` canaries padded to their length; the number of labels)."""
    max_length = int(cfg["train"]["max_length"])
    held_out, label_names = real_examples(cfg, client)
    tokenizer = load_tokenizer(cfg["model"])
    real = tokenize(held_out, tokenizer, max_length)
    canary_set = make_canaries(
        canaries,
        length=min(canary_length, max_length),
        num_labels=len(label_names),
        vocab_size=tokenizer.vocab_size,
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        rng=rng,
    )
    # Pad canaries to the real data's length so every batch has one shape.
    pad = max_length - canary_set.tensors[0].shape[1]
    canary_set = TensorDataset(
        F.pad(canary_set.tensors[0], (0, pad), value=tokenizer.pad_token_id),
        F.pad(canary_set.tensors[1], (0, pad), value=0),
        canary_set.tensors[2],
    )
    return real, canary_set, len(label_names)


def _train_and_score(
    model: torch.nn.Module,
    data: TensorDataset,
    known: TensorDataset,
    settings: TrainSettings,
    *,
    rounds: int,
    canaries: int,
    ridge: float,
) -> tuple[list[float], list]:
    """The client's run, scored round by round: (each canary's score, the accountant history).

    ``rounds`` calls of local_train, ``local_epochs`` each, σ calibrated once for all planned
    steps and the accountant history carried from round to round, exactly as client/round.py
    does (there the global model between rounds also holds other clients' updates; here the
    audited client trains alone).
    """
    scores = torch.zeros(canaries)
    history: list = []
    for _ in range(rounds):
        # Score of this round's released update: its joint least-squares coefficients on
        # the examples' own descent directions at the round's start model.
        directions = canary_directions(model, known)
        start = flat_trainable(model)
        dp = dataclasses.replace(settings.dp, prior_history=tuple(history))
        history = local_train(model, data, dataclasses.replace(settings, dp=dp)).history
        scores += joint_scores(directions, flat_trainable(model) - start, ridge)[:canaries]
    return scores.tolist(), history
