"""Federated partitioning: one training partition per client, and the one a client uses.

Deterministic given the seed: clients and the server each partition the same training
split themselves and agree without exchanging data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a device whose features are cached reads no data (1 s of imports)
    import datasets
    from flwr_datasets.partitioner import Partitioner

from common.data.cache import DATA_CACHE, key_of
from common.data.settings import integer, plain, positive_float, required
from common.data.sources import PREFERENCES, client_test_split, load_splits
from common.errors import ConfigError


def partition_train(
    train: datasets.Dataset, partition_cfg: Mapping, *, num_clients: int, seed: int
) -> list[datasets.Dataset]:
    """One Dataset per client (index = partition id), by ``partition.name``.

    Deterministic given ``seed``. An impossible setting (an empty client, a Dirichlet
    draw that never meets ``min_partition_size``, ...) is a ConfigError naming it.
    """
    cfg = plain(partition_cfg)
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError("num_clients", f"must be a positive integer, got {num_clients!r}")
    if num_clients > len(train):
        raise ConfigError("num_clients", f"{num_clients} clients but only {len(train)} training examples")
    name = cfg.get("name")
    builder = _PARTITIONERS.get(name)
    if builder is None:
        raise ConfigError("partition.name", f"unknown partitioning {name!r}; use one of {sorted(_PARTITIONERS)}")
    partitioner, setting, data = builder(cfg, train, num_clients, seed)
    partitioner.dataset = data
    try:
        with warnings.catch_warnings():
            if name == "dirichlet":  # its per-retry warnings are noise; the outcome is checked below
                warnings.simplefilter("ignore")
            parts = [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        raise ConfigError(
            setting, f"cannot partition {len(train)} examples over {num_clients} clients with {_describe(cfg)}: {err}"
        ) from err
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(setting, f"clients {empty} get no examples with {_describe(cfg)}")
    return parts


def _iid(cfg: dict, train: datasets.Dataset, num_clients: int, seed: int):
    # IidPartitioner cuts contiguous shards, so shuffle first: files are often sorted
    # by label (Banking77 is), which would make "IID" shards single-class.
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_clients), "num_clients", train.shuffle(seed=seed)


def _dirichlet(cfg: dict, train: datasets.Dataset, num_clients: int, seed: int):
    alpha = positive_float(cfg, "alpha", section="partition")
    min_size = integer(cfg, "min_partition_size", minimum=1, section="partition")
    if min_size * num_clients > len(train):
        raise ConfigError(
            "partition.min_partition_size",
            f"{min_size} examples for each of {num_clients} clients needs more than the {len(train)} training examples",
        )
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=bool(cfg["self_balancing"]),
        shuffle=True,
        seed=seed,
    )
    return partitioner, "partition.alpha", train


def _pathological(cfg: dict, train: datasets.Dataset, num_clients: int, seed: int):
    per_client = integer(cfg, "classes_per_client", minimum=1, section="partition")
    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(  # common.config.schema checks class_assignment's values
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=per_client,
        class_assignment_mode=cfg["class_assignment"],
        shuffle=True,
        seed=seed,
    )
    return partitioner, "partition.classes_per_client", train


def _natural(cfg: dict, train: datasets.Dataset, num_clients: int, seed: int):
    by = required(cfg, "by", section="partition")
    if by not in train.column_names:
        raise ConfigError("partition.by", f"column {by!r} not in the training data; columns are {train.column_names}")
    ids = train.unique(by)
    if len(ids) != num_clients:
        raise ConfigError(
            "partition.by",
            f"column {by!r} has {len(ids)} distinct values but "
            f"num_clients={num_clients}; natural partitioning needs one per client",
        )
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by=by), "partition.by", train


#: name -> builder(cfg, train, num_clients, seed) returning the partitioner, the
#: setting to blame when it fails, and the data it should partition.
_PARTITIONERS: dict[str, Callable[[dict, datasets.Dataset, int, int], tuple[Partitioner, str, datasets.Dataset]]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "natural": _natural,
}


def client_partitions(train: datasets.Dataset, cfg: Mapping) -> list[datasets.Dataset]:
    """One training partition per client for the whole config: ``data=preferences`` gives
    each client its own simulated user's rows (the ``user`` column); any other source is
    cut by the ``partition`` group (:func:`partition_train`)."""
    num_clients, seed = int(cfg["num_clients"]), int(cfg["seed"])
    if plain(cfg["data"]).get("source") == PREFERENCES:
        users = train["user"]
        parts = [train.select([i for i, u in enumerate(users) if u == c]) for c in range(num_clients)]
        empty = [i for i, part in enumerate(parts) if len(part) == 0]
        if empty:
            raise ConfigError("data.items_per_user", f"clients {empty} get no examples")
        return parts
    return partition_train(train, cfg["partition"], num_clients=num_clients, seed=seed)


def held_out_fraction(cfg: Mapping) -> float:
    """``data.client_test_fraction``: the share of each client's own data it keeps for its own
    evaluation and never trains on (0: none)."""
    return float(plain(cfg["data"]).get("client_test_fraction") or 0.0)


def client_split_seed(cfg: Mapping, who: int | str | None) -> int:
    """The seed of one client's held-out split: the run's ``seed`` and the client's partition
    (or its own file), so that a client holds the same part out in every round and run."""
    return int(key_of("client-test", cfg["seed"], who)[:15], 16)


def split_client(
    cfg: Mapping, part: datasets.Dataset, who: int | str | None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training part, held-out part) of one client's data (:func:`held_out_fraction`): the held-out
    part is cut here, where the client's data is loaded, before anything is tokenised or
    computed from it, so no training path can ever read it."""
    fraction = held_out_fraction(cfg)
    if fraction <= 0:
        return part, part.select([])
    return client_test_split(part, fraction, client_split_seed(cfg, who))


def _describe(cfg: dict) -> str:
    return ", ".join(f"partition.{k}={v!r}" for k, v in cfg.items())


def load_client_data(cfg: Mapping, partition_id: int) -> tuple[datasets.Dataset, list[str]]:
    """This client's training partition and the label names, from the whole config: its
    partition less the part it holds out for its own evaluation (``data.client_test_fraction``;
    :func:`load_client_split`)."""
    train, _, names = load_client_split(cfg, partition_id)
    return train, names


def load_client_split(cfg: Mapping, partition_id: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(this client's training part, its held-out part, the label names), from the whole config.

    The data configuration's partitions are read and cut once per process and bytes of its
    files (:data:`common.data.cache.DATA_CACHE`): every client of a simulation actor is served from them.
    """
    relevant = {
        "data": plain(cfg["data"]),
        "partition": plain(cfg["partition"]),
        "seed": cfg["seed"],
        "num_clients": cfg["num_clients"],
    }

    def read():
        train, _, names = load_splits(relevant["data"], seed=relevant["seed"], num_clients=relevant["num_clients"])
        return client_partitions(train, relevant), names

    files = {f"data.{k}": relevant["data"].get(k) for k in ("path", "test_path")}
    parts, names = DATA_CACHE.get(("partitions", relevant), read, files)
    if not 0 <= partition_id < len(parts):
        raise ConfigError("num_clients", f"partition id {partition_id} is outside [0, {len(parts)})")
    train, held_out = split_client(relevant, parts[partition_id], partition_id)
    return train, held_out, names
