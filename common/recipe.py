"""The training recipe: which stage each round runs, and what each stage computes.

Stages, in run order (``recipe.*``, DESIGN.md "Recipe"):

1. ``prototypes`` (round 1 when ``recipe.prototypes``): each client releases its per-class
   sums of unit-norm pooled features, noised; the server sums them and the head starts as
   ``recipe.prototype_scale`` × the unit-norm sums — a cosine classifier over the classes
   (Wahdany et al. 2024, "Beyond the Mean: Differentially Private Prototypes").
2. ``head``: DP-SGD on the linear head alone over features each client computed once
   (the encoder is frozen in these rounds, so its features do not change).
3. ``encoder`` (the last ``recipe.encoder_rounds``; null: every round): the model's own
   trainable parameters (adapters and head, or all of ``minilm_full``) train through the
   encoder, as before recipes existed.

The release mechanism (noise, sensitivity) lives in ``client.training.dp_train``; its accounting
in ``common.privacy.accounting``; this module holds the schedule and the server's read-out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.errors import ConfigError

#: The head every recipe stage can address: PooledClassifier's and HF's classifier Linear.
HEAD_PREFIX = "classifier."


def recipe_of(cfg: Mapping) -> dict:
    return dict(cfg["recipe"])


def stage_rounds(cfg: Mapping) -> dict[str, int]:
    """Planned rounds per stage; they add up to ``rounds``."""
    recipe = recipe_of(cfg)
    rounds = int(cfg["rounds"])
    proto = 1 if recipe["prototypes"] else 0
    enc = recipe["encoder_rounds"]
    encoder = rounds - proto if enc is None else int(enc)
    return {"prototypes": proto, "head": rounds - proto - encoder, "encoder": encoder}


def stage_of(cfg: Mapping, server_round: int) -> str:
    """The stage ``server_round`` (1-based) runs."""
    plan = stage_rounds(cfg)
    if server_round <= plan["prototypes"]:
        return "prototypes"
    if server_round <= plan["prototypes"] + plan["head"]:
        return "head"
    return "encoder"


def validate_recipe(cfg: Mapping) -> None:
    """Config-only checks of ``recipe.*`` (``common.config.validate.validate`` calls this)."""
    recipe = recipe_of(cfg)
    if not isinstance(recipe["prototypes"], bool):
        raise ConfigError("recipe.prototypes", f"must be true or false, got {recipe['prototypes']!r}")
    for key in ("prototype_share", "prototype_scale"):
        value = recipe[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"recipe.{key}", f"must be a number > 0, got {value!r}")
    if not recipe["prototype_share"] < 1:
        raise ConfigError(
            "recipe.prototype_share", f"must be < 1 (the rest is DP-SGD's), got {recipe['prototype_share']!r}"
        )
    enc = recipe["encoder_rounds"]
    if enc is not None and (isinstance(enc, bool) or not isinstance(enc, int) or enc < 0):
        raise ConfigError("recipe.encoder_rounds", f"must be null or an integer >= 0, got {enc!r}")
    plan = stage_rounds(cfg)
    if plan["head"] < 0:
        raise ConfigError(
            "recipe.encoder_rounds",
            f"{enc} encoder rounds{' after the prototype round' if plan['prototypes'] else ''} "
            f"do not fit in rounds={cfg['rounds']}",
        )
    if plan["head"] > 0:
        lr = recipe["head_lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError("recipe.head_lr", f"must be a number > 0, got {lr!r}")


def check_model(cfg: Mapping, model: nn.Module) -> None:
    """Model-dependent checks: a prototype or head stage needs pooled features and a head."""
    plan = stage_rounds(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if plan["prototypes"] or plan["head"]:
        if not hasattr(model, "features"):
            raise ConfigError(
                "model.pooling",
                "the recipe's prototype and head stages read pooled features: "
                "set model.pooling=auto|mean|cls (or recipe=finetune)",
            )
        head = head_shape(model)
        if plan["prototypes"] and head[1] != model.config.hidden_size:
            raise ConfigError("recipe.prototypes", "the head does not read the pooled features directly")
    if plan["encoder"] and not any(not n.startswith(HEAD_PREFIX) for n in trainable):
        raise ConfigError(
            "recipe.encoder_rounds",
            "the model trains no encoder parameters (freeze_encoder, "
            "no adapters): encoder rounds would train the head the slow way; use 0",
        )


def head_shape(model: nn.Module) -> tuple[int, int]:
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ConfigError("model", "the recipe's head stages need a linear classifier head")
    return tuple(classifier.weight.shape)


def head_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The trainable keys a prototype or head round changes (the rest stay as they are)."""
    return [k for k in state if k.startswith(HEAD_PREFIX)]


def round_aggregation(cfg: Mapping, server_round: int, state: Mapping[str, torch.Tensor]) -> dict:
    """``server.round.aggregate.aggregate``'s stage arguments for ``server_round``: which tensors
    move (``keys``; None = all) and whether the round is the prototype read-out."""
    stage = stage_of(cfg, server_round)
    return {
        "keys": None if stage == "encoder" else head_keys(state),
        "prototype_scale": float(recipe_of(cfg)["prototype_scale"]) if stage == "prototypes" else None,
    }


def head_from_prototypes(sums: torch.Tensor, scale: float) -> torch.Tensor:
    """The head's weight from released per-class sums: ``scale`` × each row at unit norm.

    Post-processing of the release (no ε). A row that came out exactly zero (no noise, no
    examples of that class anywhere) stays zero.
    """
    sums = sums.to(torch.float64)
    norms = sums.norm(dim=1, keepdim=True)
    return (scale * sums / torch.where(norms > 0, norms, torch.ones_like(norms))).to(torch.float32)
