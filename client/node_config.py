"""A device's own settings: ``flower-supernode --node-config "key=value ..."``.

Keys (all optional except where said):
- ``state-dir``: where this device's privacy ledger lives. Required in deployment
  (the server's run config carries no ``state_dir`` there: it never holds ledgers);
  in simulation the run's ``state_dir`` is used.
- ``client-id``: the stable id in the ledger and the report. Default: ``partition-id``
  for demo nodes, else an id created once and kept in ``state-dir`` (``client-id``
  file) — never Flower's node id, which changes when a node restarts.
- ``data-path``: the device's own CSV, read with the run's ``data.*`` column settings;
  without it the node trains on partition ``partition-id`` of ``num-partitions``
  (demos and simulation).
- ``device``: ``auto`` | ``cpu`` | ``cuda`` (overrides the run's ``train.device``).
- ``max-physical-batch-size``: physical batch cap (Opacus BatchMemoryManager); the
  logical batch and the privacy accounting are unchanged.
- ``max-epsilon``: the device owner's own ε cap; the lowest of it, the run's budget
  and ``privacy.sample.client_budgets`` wins (the device declines when reached).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.device import DEVICES
from common.errors import ConfigError
from common.storage import atomic_write_bytes

CLIENT_ID_FILE = "client-id"


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is and its own settings (node-config in deployment)."""

    client_id: str  # stable: partition-id in simulation, node-config client-id on a device
    partition_id: int
    state_dir: str  # where its ledger lives; never on the server in deployment
    max_epsilon: float | None = None  # the device owner's own cap
    data_path: str | None = None  # the device's own training file (else its partition-id)
    device: str | None = None  # node-config device (auto | cpu | cuda); None: the run's train.device
    max_physical_batch_size: int | None = None  # Opacus BatchMemoryManager cap; None: no split


def _given(node: Mapping[str, Any], key: str) -> Any:
    value = node.get(key)
    return None if value is None or str(value).strip() == "" else value


def _number(node: Mapping[str, Any], key: str, kind: type, *, minimum: float) -> Any:
    raw = _given(node, key)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"node-config {key}", f"must be a number, got {raw!r}") from None
    if not value >= minimum or (kind is int and float(raw) != value):
        raise ConfigError(f"node-config {key}", f"must be {'an integer' if kind is int else 'a number'} "
                          f">= {minimum}, got {raw!r}")
    return value


def kept_client_id(state_dir: str | Path) -> str:
    """The id stored in ``state_dir`` (created on first use, then never changed)."""
    path = Path(state_dir) / CLIENT_ID_FILE
    if not path.exists():
        atomic_write_bytes(path, f"device-{uuid.uuid4().hex[:12]}\n".encode())
    return path.read_text().strip()


def node_identity(node: Mapping[str, Any], cfg: Mapping[str, Any]) -> ClientIdentity:
    """This node's ClientIdentity from its node config and the run's config."""
    state_dir = _given(node, "state-dir") or cfg["state_dir"]
    if not state_dir:
        raise ConfigError("node-config state-dir", "is required in deployment: start the SuperNode with "
                          "--node-config \"state-dir=/path/on/this/device ...\" (its privacy ledger lives "
                          "there; the server never holds it)")
    state_dir = str(Path(str(state_dir)).expanduser().resolve())
    data_path = _given(node, "data-path")
    partition_id = _number(node, "partition-id", int, minimum=0)
    if _given(node, "client-id") is not None:
        client_id = str(node["client-id"]).strip()
    elif partition_id is not None and data_path is None:
        client_id = str(partition_id)
    else:
        client_id = kept_client_id(state_dir)
    if "/" in client_id or client_id in (".", ".."):
        raise ConfigError("node-config client-id", f"must not contain '/', got {client_id!r}")
    device = _given(node, "device")
    if device is not None and str(device).lower() not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError("node-config device", f"must be one of {DEVICES}, got {device!r}")
    return ClientIdentity(
        client_id=client_id,
        partition_id=partition_id or 0,
        state_dir=state_dir,
        max_epsilon=_number(node, "max-epsilon", float, minimum=0.0),
        data_path=str(Path(str(data_path)).expanduser()) if data_path else None,
        device=str(device).lower() if device is not None else None,
        max_physical_batch_size=_number(node, "max-physical-batch-size", int, minimum=1),
    )
