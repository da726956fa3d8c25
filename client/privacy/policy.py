"""The device's own checks of a request, before anything is read, trained or spent.

A run config comes from the server. The device validates it with the server's own
validator (``common.config.validate.validate``: known keys only, typed values, no ``_target_``),
then holds it against its owner's policy (``client.privacy.node_config.DevicePolicy``). A request
that fails either is declined with a fixed reason naming the setting: the device neither
trains nor writes to its ledger, and the decline is in its transparency log.

The δ default of the policy depends on the device's n, so it is checked in the round
itself (``client.round``), where n is known; everything else is checked here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from client.privacy.node_config import ClientIdentity
from common.config.validate import validate
from common.errors import ConfigError
from common.privacy.distributed import distributed

#: What a setting name may look like in a reason that leaves the device.
_SETTING_NAME = re.compile(r"[A-Za-z0-9_.\- ]{1,80}")

REASON_INVALID = "{setting}: not a valid setting for this device (checked with the server's own validator)"
REASON_REQUIRE_DP = (
    "node-config require-dp: this device sends no update without noise added on the device (privacy={mode})"
)
REASON_CLIP = "node-config max-client-clip-norm: the client clipping norm asked for is above this device's cap"
REASON_DELTA = "node-config max-delta: privacy.sample.delta is above this device's cap"
REASON_DISTRIBUTED = (
    "node-config allow-distributed-noise: this device adds all of its update's noise itself "
    "(privacy.sample.noise=distributed refused)"
)
REASON_DISTRIBUTED_PLAIN = (
    "privacy.sample.noise: distributed noise outside a SecAgg+ round would send this device's share alone"
)


def setting_name(setting: Any) -> str:
    """``setting`` if it may be sent as it stands, else a fixed placeholder."""
    text = str(setting)
    return text if _SETTING_NAME.fullmatch(text) else "(unnamed)"


def device_noise(cfg: Mapping) -> bool:
    """Whether every update of this run is noised on the device (sample-level DP)."""
    return cfg["privacy"]["mode"] in ("sample", "both")


def refusal(
    cfg: Any, who: ClientIdentity, *, client_clip_norm: float | None, secure: bool = True
) -> tuple[str, bool] | None:
    """(fixed reason, whether ``cfg`` passed validation) when the device declines this
    request; None when it may go on to its round. ``secure``: the request came as a SecAgg+ round."""
    if not isinstance(cfg, Mapping):
        return REASON_INVALID.format(setting="config"), False
    try:
        validate(cfg)
    except ConfigError as err:
        return REASON_INVALID.format(setting=setting_name(err.setting)), False
    policy = who.policy
    if distributed(cfg):
        if not policy.allow_distributed_noise:
            return REASON_DISTRIBUTED, True
        if not secure:
            return REASON_DISTRIBUTED_PLAIN, True
    if policy.require_dp and not device_noise(cfg):
        return REASON_REQUIRE_DP.format(mode=cfg["privacy"]["mode"]), True
    cap = policy.max_client_clip_norm
    if client_clip_norm is not None and cap is not None and not client_clip_norm <= cap:
        return REASON_CLIP, True
    if (
        device_noise(cfg)
        and policy.max_delta is not None
        and float(cfg["privacy"]["sample"]["delta"]) > policy.max_delta
    ):
        return REASON_DELTA, True
    return None
