"""The parameters that travel: a model's trainable state, its digest and norm, and the
forward inputs that are safe under Opacus' per-sample hooks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import nn


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of exactly the parameters that train (and so travel)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; keys and shapes must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"trainable keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(state[name])
            if value.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: identifies a set of global weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = torch.as_tensor(state[name]).detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of ``state`` together, in float64 (inf if any is not finite)."""
    squares = sum(float(torch.sum(v.detach().to(torch.float64) ** 2)) for v in state.values())
    return math.sqrt(squares) if math.isfinite(squares) else math.inf


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward kwargs that are safe under Opacus' per-sample hooks.

    BERT's default position ids are a [1, L] buffer and its token-type ids an
    ``expand``; per-sample gradients through them come out with batch 1. Contiguous
    per-example tensors avoid that trap whatever is frozen (STACK.md).
    """
    batch, length = input_ids.shape
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long, device=input_ids.device),
        "position_ids": torch.arange(length, device=input_ids.device).repeat(batch, 1),
    }
