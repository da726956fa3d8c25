"""`fedpriv audit`: an empirical privacy audit of one client's DP training, in one run.

The run (Steinke, Nasr & Jagielski 2023; the math is in common/audit.py):
1. ``m`` canaries are made for the audited client: random token sequences with random
   labels (unlike any real example, so only training on them moves their loss).
2. Each canary is included in that client's training data with probability 1/2
   (independent fair coins from the OS; the auditor keeps the bits).
3. The client trains as it would over the whole run — ``rounds × local_epochs``
   epochs of the same DP-SGD ``local_train``, σ calibrated for the run's ε on the
   data it now holds (canaries included) — in this process, so one audit is one
   training run. With ``noise=False`` σ = 0 (clipping kept): the power check.
4. Score (white-box, on the released weights): how far training moved the trainable
   weights along the canary's own descent direction, <−∇loss_i(θ₀), θ_T − θ₀> / |∇loss_i(θ₀)|.
   An included canary's clipped gradient is part of every step that samples it;
   an excluded one's direction is nearly orthogonal to the update. Guess "included"
   for the ``guesses/2`` highest scores and "excluded" for the ``guesses/2`` lowest
   (fixed before training), and turn the correct count into a lower bound on ε.
   A score is post-processing of the trained weights, so the bound is valid.

This audits the sample-level guarantee of one client's released model (its updates
are post-processing of the same training); the server-side aggregation only adds
further post-processing, so the bound applies to what the server sees as well.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, TensorDataset

from client.dp_train import DPSettings, local_train, planned_steps_per_round
from common.accounting import calibrate_noise, epsilon, sample_rate
from common.audit import audit
from common.data import load_client_data, tokenize
from common.model import instantiate_model, load_tokenizer, model_inputs


def make_canaries(m: int, *, length: int, num_labels: int, vocab_size: int, cls_id: int, sep_id: int,
                  rng: random.Random) -> TensorDataset:
    """``m`` canaries: [CLS] + random tokens + [SEP], each with a random label."""
    body = max(length - 2, 1)
    ids = torch.tensor([[cls_id, *(rng.randrange(1000, vocab_size) for _ in range(body)), sep_id]
                        for _ in range(m)], dtype=torch.long)[:, :length]
    mask = torch.ones_like(ids)
    labels = torch.tensor([rng.randrange(num_labels) for _ in range(m)], dtype=torch.long)
    return TensorDataset(ids, mask, labels)


def canary_directions(model: torch.nn.Module, canaries: TensorDataset) -> torch.Tensor:
    """[m, D]: each canary's unit descent direction over the trainable weights, at θ₀."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # no dropout: the direction of the canary itself
    rows = []
    for ids, mask, label in zip(*canaries.tensors):
        logits = model(**model_inputs(ids[None], mask[None])).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, label[None]), params)
        g = -torch.cat([x.reshape(-1) for x in grads])
        rows.append(g / g.norm().clamp_min(1e-12))
    model.train(was_training)
    return torch.stack(rows)


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def run_audit(cfg: Mapping, *, canaries: int, guesses: int, client: int = 0, noise: bool = True,
              epochs: int | None = None, confidence: float = 0.95, canary_length: int = 12,
              shared_components: int = 10) -> dict[str, Any]:
    """Insert canaries into client ``client``'s data, train once, score, bound ε."""
    if guesses > canaries or guesses < 2:
        raise ValueError("need 2 <= guesses <= canaries")
    train = cfg["train"]
    sample = cfg["privacy"]["sample"]
    rng = random.SystemRandom()  # inclusion bits and canaries: not predictable from the config
    partition, label_names = load_client_data(cfg, client)
    tokenizer = load_tokenizer(cfg["model"])
    max_length = int(train["max_length"])
    real = tokenize(partition, tokenizer, max_length)
    canary_set = make_canaries(canaries, length=min(canary_length, max_length), num_labels=len(label_names),
                               vocab_size=tokenizer.vocab_size, cls_id=tokenizer.cls_token_id,
                               sep_id=tokenizer.sep_token_id, rng=rng)
    # Pad canaries to the real data's length so every batch has one shape.
    pad = max_length - canary_set.tensors[0].shape[1]
    canary_set = TensorDataset(F.pad(canary_set.tensors[0], (0, pad), value=tokenizer.pad_token_id),
                               F.pad(canary_set.tensors[1], (0, pad), value=0), canary_set.tensors[2])
    included = [rng.random() < 0.5 for _ in range(canaries)]
    idx = torch.tensor([i for i, inc in enumerate(included) if inc], dtype=torch.long)
    inserted = TensorDataset(*(t[idx] for t in canary_set.tensors))
    data = TensorDataset(*(torch.cat([a, b]) for a, b in zip(real.tensors, inserted.tensors)))

    n, batch_size = len(data), int(train["batch_size"])
    epochs = int(epochs or int(cfg["rounds"]) * int(train["local_epochs"]))
    steps = planned_steps_per_round(n, batch_size, epochs)
    delta = float(sample["delta"])
    if noise:
        sigma = calibrate_noise(target_epsilon=float(sample["epsilon"]), delta=delta,
                                sample_rate=sample_rate(n, batch_size), steps=steps, accountant=sample["accountant"])
    else:
        sigma = 0.0
    model = instantiate_model(cfg, len(label_names))
    directions = canary_directions(model, canary_set)
    start = flat_trainable(model)
    result = local_train(model, data, epochs=epochs, batch_size=batch_size, lr=float(train["lr"]),
                         weight_decay=float(train.get("weight_decay", 0.0)),
                         optimizer=str(train.get("optimizer", "adamw")),
                         dp=DPSettings(sigma, float(sample["max_grad_norm"]), sample["accountant"], ()),
                         grad_sample_mode=str(train.get("grad_sample_mode", "hooks")))
    # Canaries of one label share a component (the head's push towards that label);
    # remove it so a score reflects the canary itself. Uses no inclusion bit.
    labels = canary_set.tensors[2]
    for y in labels.unique():
        rows = labels == y
        directions[rows] -= directions[rows].mean(0)
    # Random-token canaries also share a few "junk input" directions; project out the
    # top principal components of the canary directions (computed from all canaries).
    _, _, vt = torch.linalg.svd(directions, full_matrices=False)
    top = vt[:shared_components]
    directions -= (directions @ top.T) @ top
    scores = (directions @ (flat_trainable(model) - start)).tolist()
    found = audit(scores, included, k_plus=guesses // 2, k_minus=guesses - guesses // 2,
                  delta=delta, confidence=confidence)
    accounted = epsilon(result.history, delta, sample["accountant"]) if sigma > 0 else math.inf
    return {
        "client": client,
        "canaries": canaries,
        "canaries_included": len(idx),
        "real_examples": len(real),
        "guesses": found.guesses,
        "correct": found.correct,
        "confidence": confidence,
        "delta": delta,
        "epsilon_lower_bound": found.epsilon_lower_bound,
        "epsilon_accounted": accounted,
        "noise": noise,
        "noise_multiplier": sigma,
        "max_grad_norm": float(sample["max_grad_norm"]),
        "epochs": epochs,
        "steps": result.steps,
        "sample_rate": result.sample_rate,
        "consistent": bool(found.epsilon_lower_bound <= accounted),
        "mean_score_included": sum(s for s, i in zip(scores, included) if i) / max(len(idx), 1),
        "mean_score_excluded": sum(s for s, i in zip(scores, included) if not i) / max(canaries - len(idx), 1),
    }
