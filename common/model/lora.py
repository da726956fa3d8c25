"""LoRA adapters (peft) and the ``model.lora.target_modules`` they go into."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from common.errors import ConfigError


def with_lora(model: nn.Module, lora: Mapping, *, seq_cls: bool) -> nn.Module:
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
                raise ConfigError(
                    "model.lora.target_modules",
                    f"{target!r}: no numbered layer has a module {rest!r}{_module_hint(model)}",
                )
            for prefix, indices in sorted(layers.items()):
                ordered = sorted(indices)
                if -int(head) > len(ordered):
                    raise ConfigError(
                        "model.lora.target_modules", f"{target!r}: the model has only {len(ordered)} layers"
                    )
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
    return (
        f" (this model has {count}Linear modules such as {', '.join(linear[:3])}; "
        "-1.attention.self.value names the last layer's value projection)"
    )
