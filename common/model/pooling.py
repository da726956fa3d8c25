"""Sentence and token features over an HF encoder, and the linear heads that read them.

``model.pooling`` chooses the sentence features the head reads: ``pooler`` is HF's
``AutoModelForSequenceClassification`` (BERT's tanh pooler over [CLS]); ``mean`` and
``cls`` are a :class:`PooledClassifier` (mean over the attention mask / the first
token), optionally L2-normalised (``model.normalize``). ``auto`` follows the pretrained
checkpoint's own sentence-transformers configuration (``modules.json``, its Pooling
module's ``config.json``, whether a Normalize module follows) and is ``pooler`` where
there is none (a random initialisation, a plain HF checkpoint).

``task=token_classification`` builds a :class:`TokenClassifier` instead: a linear head over
every token's hidden state of one encoder layer (``model.token_layer``), so that a frozen
encoder's token features can be cached like the pooled ones; sentence pooling does not
apply there and ``model.pooling`` is not read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError

#: model.pooling's values (see the module docstring).
POOLINGS = ("auto", "mean", "cls", "pooler")


def resolve_pooling(pooling: str, normalize: bool | None, *, source: str, pretrained: bool) -> tuple[str, bool]:
    """(mode, normalize) that ``model.pooling`` / ``model.normalize`` mean for ``source``.

    ``auto`` reads the checkpoint's sentence-transformers configuration when its
    weights are loaded (a random initialisation was trained with no pooling at all)
    and falls back to ``pooler``; ``normalize`` null takes what ``auto`` found (false
    for an explicit mode).
    """
    if pooling not in POOLINGS:
        raise ConfigError("model.pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if normalize is not None and not isinstance(normalize, bool):
        raise ConfigError("model.normalize", f"must be null, true or false, got {normalize!r}")
    found_norm = False
    if pooling == "auto":
        found = checkpoint_pooling(source) if pretrained else None
        pooling, found_norm = found or ("pooler", False)
    return pooling, found_norm if normalize is None else normalize


#: sentence-transformers' old boolean Pooling keys -> the mode names it uses now.
_ST_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def checkpoint_pooling(source: str | Path) -> tuple[str, bool] | None:
    """The checkpoint's own sentence-transformers pooling: (mode, normalize), or None.

    Read from its files: ``modules.json`` (the module pipeline) and the Pooling module's
    ``config.json`` (the old ``pooling_mode_*`` booleans or the newer ``pooling_mode``
    string/list). None when ``source`` is no local sentence-transformers directory or
    lists no Pooling module. A pipeline this module cannot reproduce (max or weighted
    pooling, several modes concatenated, a Dense layer after pooling) is a ConfigError
    naming ``model.pooling``.
    """
    root = Path(source)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list):
        return None
    entries = [m for m in modules if isinstance(m, Mapping)]
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in entries]
    if "Pooling" not in kinds:
        return None
    at = kinds.index("Pooling")
    config_file = root / str(entries[at].get("path", "")) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.pooling", f"auto: cannot read {config_file} ({err}); set model.pooling=mean|cls|pooler"
        ) from err
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_MODE_KEYS.items() if config.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ("mean", "cls"):
        raise ConfigError(
            "model.pooling",
            "auto: the checkpoint's sentence-transformers pooling is "
            f"{'+'.join(map(str, modes)) or 'empty'}, which fedpriv does not implement "
            "(mean and cls only); set model.pooling=mean|cls|pooler",
        )
    after = kinds[at + 1 :]
    others = [k for k in after if k != "Normalize"]
    if others:
        raise ConfigError(
            "model.pooling",
            "auto: the checkpoint's sentence-transformers pipeline has "
            f"{', '.join(others)} after pooling, which fedpriv does not reproduce; set "
            "model.pooling=mean|cls|pooler",
        )
    return modes[0], "Normalize" in after


def _linear_head(config, num_labels: int) -> nn.Linear:
    """hidden -> num_labels, initialised as HF initialises its heads."""
    head = nn.Linear(int(config.hidden_size), int(num_labels))
    nn.init.normal_(head.weight, std=float(getattr(config, "initializer_range", 0.02)))
    nn.init.zeros_(head.bias)
    return head


def _encode(backbone: nn.Module, input_ids, attention_mask, token_type_ids, position_ids):
    """The encoder's output; absent optional inputs are left to the encoder."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = {"token_type_ids": token_type_ids, "position_ids": position_ids}
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, **{k: v for k, v in extra.items() if v is not None}
    ), attention_mask


class PooledClassifier(nn.Module):
    """An encoder (HF ``AutoModel``), pooled features, optional L2 norm, a linear head.

    ``pooling``: ``mean`` (the last hidden states averaged over the attention mask, as
    sentence-transformers computes it), ``cls`` (the first token's hidden state) or
    ``pooler`` (the encoder's own pooler output; only built with normalisation, plain
    ``pooler`` is HF's classifier). An unused encoder pooler is dropped: trainable
    parameters that never get a gradient would break Opacus.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, *, pooling: str, normalize: bool):
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise ConfigError("model.pooling", f"unknown pooling {pooling!r}")
        has_pooler = isinstance(getattr(encoder, "pooler", None), nn.Module)
        if pooling == "pooler" and not has_pooler:
            raise ConfigError("model.pooling", f"{type(encoder).__name__} has no pooler; use mean or cls")
        if pooling != "pooler" and has_pooler:
            encoder.pooler = None
        self.backbone = encoder
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.config = encoder.config
        self.num_labels = int(num_labels)
        self.classifier = _linear_head(encoder.config, self.num_labels)

    def features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """The pooled (with ``normalize``: unit-norm) sentence features the head reads."""
        out, attention_mask = _encode(self.backbone, input_ids, attention_mask, token_type_ids, position_ids)
        if self.pooling == "pooler":
            pooled = out.pooler_output
        elif self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            hidden = out.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.features(input_ids, attention_mask, token_type_ids, position_ids))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TokenClassifier(nn.Module):
    """An encoder (HF ``AutoModel``) cut after one layer, optional L2 norm per token, a
    linear head on every token: ``logits`` are [batch, length, num_labels].

    ``layer`` counts from the end (-1: the last layer, -2: the one before it); the layers
    after it are dropped, not run: they would cost compute and, with adapters, hold
    trainable parameters that never get a gradient (which Opacus refuses). HF's
    ``AutoModelForTokenClassification`` reads the last layer only; on WNUT-17 (frozen
    all-MiniLM-L6-v2, central logistic regression over first subwords) the last layer
    scored entity F1 0.187 and the one before it 0.340: a sentence-embedding model's last
    layer has been trained away from token identity.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, *, layer: int, normalize: bool):
        super().__init__()
        stack = getattr(getattr(encoder, "encoder", None), "layer", None)
        if not isinstance(stack, nn.ModuleList):
            raise ConfigError("model.token_layer", f"{type(encoder).__name__} has no encoder.layer list to cut")
        depth = len(stack)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer <= -1:
            raise ConfigError(
                "model.token_layer",
                f"must be an integer from -{depth} (the first of this "
                f"encoder's {depth} layers) to -1 (the last), got {layer!r}",
            )
        keep = depth + layer + 1
        encoder.encoder.layer = nn.ModuleList(list(stack)[:keep])
        encoder.config.num_hidden_layers = keep
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None  # unused: a trainable parameter without gradient breaks Opacus
        self.backbone = encoder
        self.layer = int(layer)
        self.normalize = bool(normalize)
        self.config = encoder.config
        self.num_labels = int(num_labels)
        self.classifier = _linear_head(encoder.config, self.num_labels)

    def features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Every token's hidden state after the kept layers, [batch, length, hidden]."""
        hidden = _encode(self.backbone, input_ids, attention_mask, token_type_ids, position_ids)[0].last_hidden_state
        return nn.functional.normalize(hidden, p=2, dim=-1) if self.normalize else hidden

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        from transformers.modeling_outputs import TokenClassifierOutput

        logits = self.classifier(self.features(input_ids, attention_mask, token_type_ids, position_ids))
        loss = (
            None
            if labels is None
            else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        )
        return TokenClassifierOutput(loss=loss, logits=logits)
