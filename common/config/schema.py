"""The shape of the composed config: every key, its type and the values it allows.

``conf/*.yaml`` is the one place defaults live: this module holds no default value,
only what a value may be, so that a user reads a default where they change it. The
composed config (Hydra compose + resolve, or a resumed run's stored config) is
checked against :data:`SCHEMA` by :func:`check` — ``common.config.validate.validate`` calls it
first — and each failure is one :class:`ConfigError` naming the setting:

- a key the schema does not know (``+train.lerning_rate=0.1``): a misspelling;
- a key the schema wants and the config lacks;
- a value of the wrong type (``train.lr=fast``) or not among the allowed values.

Ranges and relations between settings (``delta < 1``, thresholds below share counts)
stay in ``common.config.validate``. A group whose keys depend on the option (``data`` by
``data.source``, ``partition`` and ``strategy`` by their ``name``) is a :class:`Variant`.
Every key is required: a stored config of an older run is brought up to date before it
is checked (``common.config.upgrade``). One marked :class:`Filled` is one the server adds
where the group has none (``data.labels``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import ConfigError
from common.model.factory import CONFIG_OVERRIDE_KEYS, TASKS
from common.model.pooling import POOLINGS
from common.privacy.accounting import ACCOUNTANTS

PRIVACY_MODES = ("none", "sample", "client", "both")
CLIPPING_MODES = ("fixed", "adaptive")


class Spec:
    """What one value may be; :meth:`check` raises ConfigError naming ``setting``."""

    def check(self, value: Any, setting: str) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Type(Spec):
    def __init__(self, name: str, test):
        self.name, self.test = name, test

    def check(self, value: Any, setting: str) -> None:
        if not self.test(value):
            raise ConfigError(setting, f"must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        return self.name


#: An integer; an integral float (``5.0``) passes, as the range checks always took it.
Int = _Type("an integer", lambda v: _is_number(v) and (isinstance(v, int) or (math.isfinite(v) and v == int(v))))
Float = _Type("a number", _is_number)
Bool = _Type("true or false", lambda v: isinstance(v, bool))
Str = _Type("a string", lambda v: isinstance(v, str))
Scalar = _Type("a string, number or boolean", lambda v: isinstance(v, (str, int, float, bool)))


class Nullable(Spec):
    """null, or a value of ``spec``."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def check(self, value: Any, setting: str) -> None:
        if value is not None:
            try:
                self.spec.check(value, setting)
            except ConfigError as err:
                if err.setting != setting:
                    raise  # a nested key's own error
                raise ConfigError(setting, f"must be null or {self.spec.describe()}, got {value!r}") from None

    def describe(self) -> str:
        return f"null or {self.spec.describe()}"


class OneOf(Spec):
    def __init__(self, *specs: Spec):
        self.specs = specs

    def check(self, value: Any, setting: str) -> None:
        for spec in self.specs:
            try:
                spec.check(value, setting)
                return
            except ConfigError:
                continue
        raise ConfigError(setting, f"must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        return " or ".join(s.describe() for s in self.specs)


class Choice(Spec):
    """One of ``values``. ``blame``: the setting to name instead (``privacy.mode`` is
    chosen as the group ``privacy=<mode>``, so an unknown mode names ``privacy``)."""

    def __init__(self, *values: str, blame: str | None = None):
        self.values, self.blame = tuple(values), blame

    def check(self, value: Any, setting: str) -> None:
        if not isinstance(value, str) or value not in self.values:
            raise ConfigError(self.blame or setting, f"must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        return f"one of {list(self.values)}"


class ListOf(Spec):
    def __init__(self, item: Spec):
        self.item = item

    def check(self, value: Any, setting: str) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(setting, f"must be {self.describe()}, got {value!r}")
        for i, v in enumerate(value):
            self.item.check(v, f"{setting}.{i}")

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"


class MapOf(Spec):
    """A map with keys of the user's choosing (``privacy.sample.client_budgets``), or of an
    allow-list (``keys``: ``model.config_overrides``)."""

    def __init__(self, value: Spec, keys: frozenset[str] | None = None):
        self.value, self.keys = value, keys

    def check(self, value: Any, setting: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(setting, f"must be {self.describe()}, got {value!r}")
        for k, v in value.items():
            if self.keys is not None and k not in self.keys:
                raise ConfigError(f"{setting}.{k}", f"is not a setting fedpriv passes on; allowed: {sorted(self.keys)}")
            self.value.check(v, f"{setting}.{k}")

    def describe(self) -> str:
        return f"a map of {self.value.describe()}"


class Filled(Spec):
    """A key the server fills in where a group lacks it: ``data.labels`` (deployment puts the
    run's classes into every data group, so that they travel to the devices)."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def check(self, value: Any, setting: str) -> None:
        self.spec.check(value, setting)

    def describe(self) -> str:
        return self.spec.describe()


class Section(Spec):
    """A map with exactly these keys (a :class:`Filled` one may be absent)."""

    def __init__(self, fields: Mapping[str, Spec]):
        self.fields = dict(fields)

    def check(self, value: Any, setting: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(setting or "config", f"must be a map of settings, got {value!r}")
        _check_fields(value, self.fields, setting)

    def describe(self) -> str:
        return "a map of settings"


class Variant(Spec):
    """A group whose keys depend on its option, named by the key ``by``."""

    def __init__(self, by: str, options: Mapping[str, Mapping[str, Spec]]):
        self.by, self.options = by, {name: dict(fields) for name, fields in options.items()}

    def check(self, value: Any, setting: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(setting, f"must be a map of settings, got {value!r}")
        if self.by not in value:
            raise ConfigError(_join(setting, self.by), "is missing")
        Choice(*self.options).check(value[self.by], _join(setting, self.by))
        _check_fields(value, self.options[value[self.by]], setting)

    def describe(self) -> str:
        return "a map of settings"


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _check_fields(value: Mapping, fields: Mapping[str, Spec], setting: str) -> None:
    for key in value:
        if key not in fields:
            raise ConfigError(
                _join(setting, key),
                f"is not a setting fedpriv knows (misspelt?); {setting or 'the config'} has {sorted(fields)}",
            )
    for key, spec in fields.items():
        if key not in value:
            if isinstance(spec, Filled):
                continue
            raise ConfigError(_join(setting, key), "is missing")
        spec.check(value[key], _join(setting, key))


# --- the config -------------------------------------------------------------------

_STRATEGY = {
    "name": Str,
    "fraction_train": Float,
    "min_train_clients": Int,
    "server_lr": Float,
    "max_update_norm": Nullable(Float),
}
_COLUMNS = {"text_column": Str, "label_column": Str}
_CSV = {
    "name": Str,
    "source": Str,
    "path": Str,
    "test_path": Nullable(Str),
    "test_fraction": Float,
    **_COLUMNS,
    "delimiter": Str,
    "column_names": Nullable(ListOf(Str)),
    "quoting": Nullable(OneOf(Str, Int)),
    "drop_duplicates": Bool,
    "encoding": Str,
}
#: Every data group: the share of a client's own data it holds out for its own evaluation.
_HELD_OUT = {"client_test_fraction": Float}
_PERSONAL_SGD = {"name": Str, "epochs": Int, "lr": Float, "momentum": Float, "batch_size": Int, "weight_decay": Float}
_LABELS = Nullable(ListOf(Scalar))

#: The composed config. Where an implementation defines the allowed values, they come
#: from it (POOLINGS, ACCOUNTANTS); the options of ``data``, ``partition`` and ``strategy``
#: are checked against common.data.sources' loaders, common.data.partition's partitioners
#: and server.round.optimizer's rules by tests/common/test_config.py (common imports no
#: server code, and validation needs no data library).
SCHEMA = Section(
    {
        "task": Choice(*TASKS),
        "seed": Int,
        "num_clients": Int,
        "rounds": Int,
        "secagg": Bool,
        "resume": Nullable(Str),
        "state_dir": Nullable(Str),  # null in deployment: ledgers live on the devices
        "secaggplus": Section(
            {
                "num_shares": OneOf(Choice("auto"), Float),
                "reconstruction_threshold": OneOf(Choice("auto"), Float),
                "corrupt_fraction": Float,
                "dropout_fraction": Float,
                "clipping_range": Float,
                "quantization_range": Int,
                "modulus_range": Int,
            }
        ),
        "evaluation": Section({"batch_size": Int, "explain_inputs": Int, "client_every": Int}),
        "simulation": Section(
            {
                "client_app": Nullable(Str),
                "cpus_per_client": Float,
                "gpus_per_client": Float,
                "num_cpus": Nullable(Int),
                "in_flight_per_worker": Nullable(Int),
                "runtime": Choice("superlink", "engine"),
            }
        ),
        "federation": Section({"ray_address": Nullable(Str)}),
        "round_timeout_s": Float,
        "node_wait_s": Float,
        "model": Section(
            {
                "name_or_path": Str,
                "tokenizer": Nullable(Str),
                "pretrained": Bool,
                "config_overrides": MapOf(Nullable(Scalar), keys=CONFIG_OVERRIDE_KEYS),
                "lora": Nullable(
                    Section({"r": Int, "alpha": Int, "dropout": Float, "target_modules": OneOf(Str, ListOf(Str))})
                ),
                "freeze_embeddings": Bool,
                "freeze_encoder": Bool,
                "pooling": Choice(*POOLINGS),
                "normalize": Nullable(Bool),
                "token_layer": Int,
            }
        ),
        "data": Variant(
            "source",
            {
                "synthetic": {
                    "name": Str,
                    "source": Str,
                    "num_classes": Int,
                    "num_users": Int,
                    "train_size": Int,
                    "test_size": Int,
                    "label_noise": Float,
                    "ambiguous_fraction": Float,
                    "labels": Filled(_LABELS),
                    **_HELD_OUT,
                },
                "csv": {**_CSV, "labels": _LABELS, **_HELD_OUT},
                "preferences": {
                    **_CSV,
                    "labels": _LABELS,
                    "liked_topics": Int,
                    "items_per_user": Int,
                    "test_items_per_user": Int,
                    "liked_share": Float,
                    "click_noise": Float,
                    **_HELD_OUT,
                },
                "conll": {
                    "name": Str,
                    "source": Str,
                    "path": Str,
                    "test_path": Nullable(Str),
                    "test_fraction": Float,
                    "tag_column": Int,
                    "labels": _LABELS,
                    **_HELD_OUT,
                },
                "hf_tokens": {
                    "source": Str,
                    "name": Str,
                    "train_split": Str,
                    "test_split": Str,
                    "tokens_column": Str,
                    "tags_column": Str,
                    "labels": _LABELS,
                    **_HELD_OUT,
                },
                "hf": {
                    "source": Str,
                    "name": Str,
                    "train_split": Str,
                    "test_split": Str,
                    **_COLUMNS,
                    "labels": Filled(_LABELS),
                    **_HELD_OUT,
                },
            },
        ),
        "partition": Variant(
            "name",
            {
                "iid": {"name": Str},
                "dirichlet": {"name": Str, "alpha": Float, "min_partition_size": Int, "self_balancing": Bool},
                "natural": {"name": Str, "by": Str},
                "pathological": {
                    "name": Str,
                    "classes_per_client": Int,
                    "class_assignment": Choice("deterministic", "random", "first-deterministic"),
                },
            },
        ),
        "privacy": Section(
            {
                "mode": Choice(*PRIVACY_MODES, blame="privacy"),
                "sample": Section(
                    {
                        "epsilon": Float,
                        "delta": Float,
                        "max_grad_norm": Float,
                        "accountant": Choice(*sorted(ACCOUNTANTS)),
                        "client_budgets": MapOf(Float),
                        "noise": Choice("local", "distributed"),
                        "distributed": Section(
                            {
                                "n_min": Float,
                                "granularity": Int,
                                "sample_rate": Float,
                                "count_units": Int,
                                "prototype_share": Float,
                            }
                        ),
                    }
                ),
                "client": Section(
                    {
                        "clipping": Choice(*CLIPPING_MODES),
                        "clipping_norm": Float,
                        "noise_multiplier": Nullable(Float),
                        "epsilon": Float,
                        "delta": Float,
                        "target_quantile": Float,
                        "clip_lr": Float,
                        "clipped_count_stddev": Nullable(Float),
                    }
                ),
            }
        ),
        "strategy": Variant(
            "name",
            {
                "fedavg": _STRATEGY,
                "fedavgm": {**_STRATEGY, "server_momentum": Float},
                "fedadam": {**_STRATEGY, "beta_1": Float, "beta_2": Float, "tau": Float},
            },
        ),
        "recipe": Section(
            {
                "name": Str,
                "prototypes": Bool,
                "prototype_share": Float,
                "prototype_scale": Float,
                "head_lr": Nullable(Float),
                "encoder_rounds": Nullable(Int),
            }
        ),  # head_lr null: no head stage
        "train": Section(
            {
                "local_epochs": Int,
                "batch_size": Nullable(Int),
                "sample_rate": Nullable(Float),
                "sample_rate_dp": Float,
                "sample_rate_no_dp": Float,
                "optimizer": Choice("sgd", "adamw"),
                "lr": Float,
                "weight_decay": Float,
                "max_length": Int,
                "outside_weight": Float,
                "device": Choice("cpu", "cuda", "auto"),
                "precision": Choice("fp32", "bf16", "fp16", "auto"),
                "max_physical_batch_size": Nullable(Int),
                "grad_sample_mode": Choice("hooks", "ghost"),
            }
        ),
        "audit": Section({"canaries": Int, "guesses": Int, "client": Int, "noise": Bool, "confidence": Float}),
        # After the rounds each device trains a personal model it keeps (client.personal).
        "personalize": Variant(
            "name",
            {
                "none": {"name": Str},
                "finetune": _PERSONAL_SGD,
                "mixture": {**_PERSONAL_SGD, "alpha": Float, "alpha_lr": Float},
            },
        ),
        "tracking": Variant(
            "name",
            {
                "none": {"name": Str, "uri": Nullable(Str)},
                "mlflow": {"name": Str, "uri": Str, "experiment": Str},
            },
        ),
    }
)


def check(cfg: Mapping) -> None:
    """Raise ConfigError naming the first key of ``cfg`` that does not fit :data:`SCHEMA`."""
    SCHEMA.check(cfg, "")


#: ``personalize.name``'s values (conf/personalize/).
PERSONALIZE = tuple(SCHEMA.fields["personalize"].options)

#: ``strategy.name``'s values: server.round.optimizer's update rules.
STRATEGIES = tuple(SCHEMA.fields["strategy"].options)
