"""The server's checks before any training that need more than the config."""

import pytest

from client.privacy.ledger import Ledger
from common.errors import ConfigError
from server.round.loop import prepare


@pytest.mark.parametrize(
    "override,setting,value",
    [
        ("privacy.sample.delta=1e-3", "privacy.sample.delta", "1e-05"),
        ("privacy.sample.accountant=prv", "privacy.sample.accountant", "'rdp'"),
    ],
)
def test_simulation_refuses_a_delta_or_accountant_other_than_the_ledgers(fast_cfg, override, setting, value):
    cfg = fast_cfg(override)
    ledger = Ledger("1", history=[(1.0, 0.1, 10)], delta=1e-5, accountant="rdp")
    ledger.commit(cfg["state_dir"])
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert err.value.setting == setting and value in str(err.value)


def test_simulation_accepts_the_ledgers_own_delta(fast_cfg):
    cfg = fast_cfg()
    Ledger("1", history=[(1.0, 0.1, 10)], delta=1e-5, accountant="rdp").commit(cfg["state_dir"])
    assert prepare(cfg).partition_sizes
