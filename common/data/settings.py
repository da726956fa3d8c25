"""Reading the ``data`` and ``partition`` settings: every failure names the dotted setting."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError

#: OmegaConf's "mandatory, not set" marker, as it appears in a plain-dict config.
MISSING = "???"


def plain(cfg: Any) -> dict:
    """A plain dict; an unset mandatory OmegaConf value stays as the string '???'."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return dict(cfg)


def required(cfg: dict, key: str, *, section: str = "data") -> Any:
    value = cfg.get(key)
    if value is None or value == MISSING:
        raise ConfigError(f"{section}.{key}", f"is required; set it, e.g. {section}.{key}=...")
    return value


def integer(cfg: dict, key: str, *, minimum: int, section: str = "data") -> int:
    value = required(cfg, key, section=section)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{key}", f"must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float(cfg: dict, key: str, *, section: str) -> float:
    value = required(cfg, key, section=section)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{section}.{key}", f"must be a number > 0, got {value!r}")
    return float(value)


def unit_fraction(cfg: dict, key: str, *, low_inclusive: bool) -> float:
    value = cfg.get(key)
    if value is None or value == MISSING:
        raise ConfigError(f"data.{key}", "is required; set it, e.g. data.%s=0.2" % key)
    low_ok = value >= 0 if low_inclusive else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value < 1):
        bound = "[0, 1)" if low_inclusive else "(0, 1)"
        raise ConfigError(f"data.{key}", f"must be a number in {bound}, got {value!r}")
    return float(value)


def csv_quoting(value: Any) -> int:
    """``null`` (pandas' default), a ``csv`` module constant name, or its int value."""
    names = {n: getattr(csv, n) for n in dir(csv) if n.startswith("QUOTE_")}
    if value is None:
        return csv.QUOTE_MINIMAL
    if isinstance(value, str) and value.upper() in names:
        return names[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in names.values():
        return value
    raise ConfigError("data.quoting", f"unknown quoting {value!r}; use null or one of {sorted(names)}")


def existing_file(cfg: dict, key: str) -> Path:
    """The configured path resolved against the current directory; it must exist."""
    raw = required(cfg, key)
    path = Path(str(raw)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"data.{key}", f"no such file: {path} (from {raw!r}, relative to the current directory {Path.cwd()})"
        )
    return path
