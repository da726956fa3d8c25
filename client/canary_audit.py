"""`fedpriv audit`: an empirical privacy audit of one client's DP training, in one run.

The run (Steinke, Nasr & Jagielski 2023; the math is in common/privacy/audit_bounds.py):
1. ``m`` canaries are made: random token sequences with random labels (unlike any real
   example, so only training on them moves their loss).
2. The real examples are data that belongs to no client: as many examples of the run's
   held-out test split as the audited client (``audit.client``) holds, so that n, q and
   σ are that client's. No client trains on the test split; the server evaluates on it
   and its metrics are already released without DP noise (the report's caveats). So
   the audit spends no client's budget and needs no ledger entry: it reads only the
   size of the client's partition (released anyway, as the sample rate), never its
   examples. audit.json says so in ``real_data``.
   Each canary is added to those examples with probability 1/2 (independent fair coins
   from the OS; the auditor keeps the bits).
3. Training is the client's over the whole run: ``rounds`` calls of the same
   DP-SGD ``local_train``, ``train.local_epochs`` each, σ calibrated once for all planned
   steps on the data it now holds (canaries included) and the accountant history
   carried from call to call (``DPSettings.prior_history``), as client/round.py does;
   in this process, so one audit is one training run. With ``noise=False`` σ = 0
   (clipping kept): the power check. Both checks use the same scoring.
4. Score (white-box, on what the client releases): before each round, every canary's
   and every real example's unit descent direction d_j at the round's start model;
   after it, the least-squares coefficients of the round's update θ_end − θ_start on
   all those directions jointly (common/privacy/audit_bounds.py ``joint_scores``). A canary's score is
   its coefficient summed over rounds: an included canary's clipped gradient is part
   of every step that samples it, an excluded one's is in none, and fitting all
   directions jointly keeps what canaries share (label, junk input) and the real
   data's share out of each other's scores. Guess "included" for the ``guesses/2``
   highest scores and "excluded" for the ``guesses/2`` lowest (fixed before training),
   and turn the correct count into a lower bound on ε.
5. Verdict (common/privacy/audit_bounds.py ``verdict``): ``exceeds`` when the bound is above the
   accounted ε; ``inconclusive`` when it is not but even all guesses right could not
   have shown the accounted ε (``max_detectable_epsilon``, the audit's power: 120
   guesses show at most 3.66); ``consistent`` only when the audit could have shown the
   accounted ε and did not exceed it. At ε = 8 that needs thousands of guesses, so the
   default audit and the ``audit=power`` preset with DP on are ``inconclusive``; noise
   off (accounted ε = ∞) is always ``inconclusive``, and its bound is the power check.

Why the bound is valid. Opacus' accounting, which gives the accounted ε, composes
every DP-SGD step of every round (adaptive composition of subsampled Gaussian
mechanisms): it covers the whole sequence of noised clipped gradient sums, hence every
function of them, the intermediate models after each round included. The score uses
only those models, the canaries, and the real examples, which were fixed before the
inclusion bits were drawn; it never uses the bits, nor which examples a step sampled.
So the guesses are post-processing of an (ε, δ)-DP output with respect to each canary,
which is what common/privacy/audit_bounds.py needs. The audit covers the sample-level guarantee of one
client-sized run's released updates; in a federated run the server sees them only after
aggregation, further post-processing, so the bound applies to what the server sees
as well (here the audited client trains alone between rounds: no other clients'
updates enter its model).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.training.dp_train import DPSettings, calibrate_run, local_train
from common.privacy.accounting import epsilon, sample_rate, train_batch_size
from common.privacy.audit_bounds import audit, joint_scores, verdict
from common.data.partition import load_client_data
from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import model_inputs


def make_canaries(m: int, *, length: int, num_labels: int, vocab_size: int, cls_id: int, sep_id: int,
                  rng: random.Random) -> TensorDataset:
    """``m`` canaries: [CLS] + random tokens + [SEP], each with a random label."""
    body = max(length - 2, 1)
    ids = torch.tensor([[cls_id, *(rng.randrange(1000, vocab_size) for _ in range(body)), sep_id]
                        for _ in range(m)], dtype=torch.long)[:, :length]
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
            ids, mask, labels = (t[start:start + chunk] for t in canaries.tensors)
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


REAL_DATA = ("held-out test split (no client trains on it; no ledger entry), as many examples as the "
             "audited client holds")


def real_examples(cfg: Mapping, client: int):
    """(examples, label names): ``len(client's partition)`` examples of the held-out test split.

    A seeded shuffle picks them (fixed before the inclusion bits are drawn); a test split
    smaller than the partition is used whole. Only the partition's size is read.
    """
    n = len(load_client_data(cfg, client)[0])
    _, test, names = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    return test.shuffle(seed=int(cfg["seed"])).select(range(min(n, len(test)))), names


def run_audit(cfg: Mapping, *, canaries: int, guesses: int, client: int, noise: bool, confidence: float,
              canary_length: int = 12, ridge: float = 1e-4) -> dict[str, Any]:
    """Canaries + held-out examples the size of client ``client``'s data: train once (round by round), score, bound ε."""
    if guesses > canaries or guesses < 2:
        raise ValueError("need 2 <= guesses <= canaries")
    train = cfg["train"]
    sample = cfg["privacy"]["sample"]
    rng = random.SystemRandom()  # inclusion bits and canaries: not predictable from the config
    held_out, label_names = real_examples(cfg, client)
    tokenizer = load_tokenizer(cfg["model"])
    max_length = int(train["max_length"])
    real = tokenize(held_out, tokenizer, max_length)
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

    # The client's run: `rounds` calls of local_train, `local_epochs` each, σ calibrated
    # once for all planned steps and the accountant history carried from round to round,
    # exactly as client/round.py does (there the global model between rounds also holds
    # other clients' updates; here the audited client trains alone).
    n = len(data)
    batch_size = train_batch_size(train, n)
    rounds, local_epochs = int(cfg["rounds"]), int(train["local_epochs"])
    q = sample_rate(n, batch_size)
    sigma = (calibrate_run(sample, n=n, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds)
             .noise_multiplier if noise else 0.0)
    delta, clip, accountant = float(sample["delta"]), float(sample["max_grad_norm"]), sample["accountant"]
    model = instantiate_model(cfg, len(label_names))
    scores = torch.zeros(canaries)
    history: list = []
    # The real examples were fixed before the inclusion bits were drawn: fitting their
    # directions too takes their share of the update out of the canaries' scores.
    known = TensorDataset(*(torch.cat([a, b]) for a, b in zip(canary_set.tensors, real.tensors)))
    for _ in range(rounds):
        # Score of this round's released update: its joint least-squares coefficients on
        # the examples' own descent directions at the round's start model.
        directions = canary_directions(model, known)
        start = flat_trainable(model)
        result = local_train(model, data, epochs=local_epochs, batch_size=batch_size, lr=float(train["lr"]),
                             weight_decay=float(train["weight_decay"]), optimizer=str(train["optimizer"]),
                             dp=DPSettings(sigma, clip, accountant, tuple(history)),
                             grad_sample_mode=str(train["grad_sample_mode"]))
        history = result.history
        scores += joint_scores(directions, flat_trainable(model) - start, ridge)[:canaries]
    scores = scores.tolist()
    found = audit(scores, included, k_plus=guesses // 2, k_minus=guesses - guesses // 2,
                  delta=delta, confidence=confidence)
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
        "sample_rate": q,
        "mean_score_included": sum(s for s, i in zip(scores, included) if i) / max(len(idx), 1),
        "mean_score_excluded": sum(s for s, i in zip(scores, included) if not i) / max(canaries - len(idx), 1),
    }
