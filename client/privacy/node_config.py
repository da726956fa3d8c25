"""A device's own settings: ``flower-supernode --node-config "key=value ..."``.

The device decides its own privacy: these keys are its owner's, and nothing in a message
(the run config included) can change them. A message can only make the device decline.

Keys (all optional except where said):
- ``state-dir``: where this device's privacy ledger lives. Required in deployment; the
  run config's ``state_dir`` is read only by a simulated client (``SIMULATION_ENV`` set by
  the simulation's host, never by a message), so a server cannot move a device's ledger.
- ``client-id``: the stable id in the ledger and the report. Default: ``partition-id``
  for demo nodes, else an id created once and kept in ``state-dir`` (``client-id``
  file) — never Flower's node id, which changes when a node restarts.
- ``data-path``: the device's own CSV, read with the run's ``data.*`` column settings;
  without it the node trains on partition ``partition-id`` of ``num-partitions``
  (demos and simulation).
- ``device``: ``auto`` | ``cpu`` | ``cuda`` (overrides the run's ``train.device``).
- ``max-physical-batch-size``: physical batch cap (Opacus BatchMemoryManager); the
  logical batch and the privacy accounting are unchanged.

The device's privacy policy (:class:`DevicePolicy`), enforced before any training:

- ``max-epsilon``: the device owner's own ε cap; the lowest of it, the run's budget
  and ``privacy.sample.client_budgets`` wins (the device declines when reached).
- ``max-delta``: the largest δ this device's ledger may be spent at; default
  min(1e-5, 1/(10 n)) for the device's n examples. A run asking for more is declined.
- ``require-dp``: default true in deployment: decline any round whose update would leave
  without noise added on this device (``privacy=none``; ``privacy=client``, whose noise the
  server adds: a device trusts that only with ``require-dp=false``).
- ``max-client-clip-norm``: the largest client-level clipping norm C this device accepts
  (client-level DP bounds what one device's update can say by C; a huge C bounds nothing).
- ``allow-distributed-noise`` (default true): whether this device takes part in
  ``privacy.sample.noise=distributed``, where it adds only its share of the noise and its ε
  against the server trusts SecAgg+ and the other clients' shares.
- ``max-local-epsilon``: a cap on the ε of this device's own message alone (its share, what
  holds if SecAgg+ were broken), checked like ``max-epsilon``.

A simulated client (no owner, the run's config is its user's own) has no policy
beyond the run's: ``require-dp`` is false and no cap applies unless a node-config sets it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.device import DEVICES
from common.errors import ConfigError
from common.protocol import SIMULATION_ENV
from common.storage import atomic_write_bytes

CLIENT_ID_FILE = "client-id"


#: The node-config keys of the privacy policy.
POLICY_KEYS = (
    "max-epsilon",
    "max-delta",
    "require-dp",
    "max-client-clip-norm",
    "allow-distributed-noise",
    "max-local-epsilon",
)
#: ``max-delta``'s default is min(DEFAULT_MAX_DELTA, 1/(10 n)).
DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class DevicePolicy:
    """What this device's owner allows, whatever the server asks (see the module docstring)."""

    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None  # None: the default for n (:meth:`delta_limit`), in deployment
    max_client_clip_norm: float | None = None
    allow_distributed_noise: bool = True
    max_local_epsilon: float | None = None  # cap on epsilon_local (distributed noise: its share alone)
    deployed: bool = False  # a device in deployment: the defaults above are the owner's floor

    def delta_limit(self, n: int) -> float | None:
        """The largest δ allowed for a device holding ``n`` examples (None: no limit of its own)."""
        if self.max_delta is not None:
            return self.max_delta
        return min(DEFAULT_MAX_DELTA, 1 / (10 * n)) if self.deployed else None


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is and its own settings (node-config in deployment)."""

    client_id: str  # stable: partition-id in simulation, node-config client-id on a device
    partition_id: int
    state_dir: str  # where its ledger lives; never on the server in deployment
    data_path: str | None = None  # the device's own training file (else its partition-id)
    device: str | None = None  # node-config device (auto | cpu | cuda); None: the run's train.device
    max_physical_batch_size: int | None = None  # Opacus BatchMemoryManager cap; None: no split
    policy: DevicePolicy = DevicePolicy()


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
        raise ConfigError(
            f"node-config {key}", f"must be {'an integer' if kind is int else 'a number'} >= {minimum}, got {raw!r}"
        )
    return value


def _flag(node: Mapping[str, Any], key: str, default: bool) -> bool:
    raw = _given(node, key)
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"node-config {key}", f"must be true or false, got {raw!r}")


def simulated() -> bool:
    """Whether this process hosts a simulated client (set by the simulation's host, not a message)."""
    return os.environ.get(SIMULATION_ENV) == "1"


def device_policy(node: Mapping[str, Any], *, deployed: bool) -> DevicePolicy:
    """The privacy policy in ``node`` (a device's node-config); deployment's defaults when ``deployed``."""
    max_delta = _number(node, "max-delta", float, minimum=0.0)
    if max_delta is not None and not 0 < max_delta < 1:
        raise ConfigError("node-config max-delta", f"must be in (0, 1), got {max_delta!r}")
    return DevicePolicy(
        require_dp=_flag(node, "require-dp", deployed),
        max_epsilon=_number(node, "max-epsilon", float, minimum=0.0),
        max_delta=max_delta,
        max_client_clip_norm=_number(node, "max-client-clip-norm", float, minimum=0.0),
        allow_distributed_noise=_flag(node, "allow-distributed-noise", True),
        max_local_epsilon=_number(node, "max-local-epsilon", float, minimum=0.0),
        deployed=deployed,
    )


def kept_client_id(state_dir: str | Path) -> str:
    """The id stored in ``state_dir`` (created on first use, then never changed)."""
    path = Path(state_dir) / CLIENT_ID_FILE
    if not path.exists():
        atomic_write_bytes(path, f"device-{uuid.uuid4().hex[:12]}\n".encode())
    return path.read_text().strip()


def node_identity(node: Mapping[str, Any], cfg: Mapping[str, Any], *, simulation: bool | None = None) -> ClientIdentity:
    """This node's ClientIdentity from its node config; a simulated client (``simulation``,
    default :func:`simulated`) alone falls back to the run config's ``state_dir``."""
    simulation = simulated() if simulation is None else simulation
    state_dir = _given(node, "state-dir")
    if state_dir is None and simulation:
        state_dir = cfg.get("state_dir") if isinstance(cfg, Mapping) else None
    if not state_dir:
        raise ConfigError(
            "node-config state-dir",
            "is required in deployment: start the SuperNode with "
            '--node-config "state-dir=/path/on/this/device ..." (its privacy ledger lives '
            "there; the server never holds it)",
        )
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
        policy=device_policy(node, deployed=not simulation),
        data_path=str(Path(str(data_path)).expanduser()) if data_path else None,
        device=str(device).lower() if device is not None else None,
        max_physical_batch_size=_number(node, "max-physical-batch-size", int, minimum=1),
    )
