"""privacy.sample.noise and privacy.sample.distributed.*: refused combinations name the setting."""

from __future__ import annotations

import pytest

from common.config.upgrade import upgrade
from common.config.validate import validate
from common.errors import ConfigError
from common.privacy.distributed import DistributedNoise
from tests.conftest import compose

BASE = ["secagg=true", "privacy.sample.noise=distributed", "model=tiny_bert", "model.pooling=mean"]


def _cfg(tmp_path, *overrides):
    return compose([*BASE, *overrides], tmp_path / "run")


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        (["secagg=false"], "privacy.sample.noise"),
        (["privacy=both"], "privacy.sample.noise"),
        (["privacy=client"], "privacy.sample.noise"),
        (["privacy.sample.accountant=prv"], "privacy.sample.accountant"),
        (["recipe=finetune"], "recipe.encoder_rounds"),
        (["privacy.sample.distributed.n_min=5", "num_clients=4"], "privacy.sample.distributed.n_min"),
        (["privacy.sample.distributed.n_min=1.5"], "privacy.sample.distributed.n_min"),
        (["privacy.sample.distributed.granularity=8"], "privacy.sample.distributed.granularity"),
        (["privacy.sample.distributed.sample_rate=0"], "privacy.sample.distributed.sample_rate"),
        (["privacy.sample.distributed.count_units=4096"], "privacy.sample.distributed.count_units"),
        (["privacy.sample.distributed.prototype_share=1"], "privacy.sample.distributed.prototype_share"),
    ],
)
def test_refused_combinations_name_the_setting(tmp_path, overrides, setting):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tmp_path, *overrides))
    assert err.value.setting == setting


def test_n_min_is_a_count_or_a_fraction_of_the_clients_asked(tmp_path):
    validate(cfg := _cfg(tmp_path, "num_clients=10"))
    assert DistributedNoise.of(cfg).n_min == 9  # the default 0.9 of 10, rounded up
    assert DistributedNoise.of(_cfg(tmp_path, "num_clients=10", "privacy.sample.distributed.n_min=3")).n_min == 3
    half = _cfg(tmp_path, "num_clients=10", "strategy.fraction_train=0.5", "privacy.sample.distributed.n_min=1.0")
    assert DistributedNoise.of(half).n_min == 5


def test_an_older_run_had_local_noise(tmp_path):
    cfg = _cfg(tmp_path)
    del cfg["privacy"]["sample"]["noise"], cfg["privacy"]["sample"]["distributed"]
    upgraded = upgrade(cfg)
    assert upgraded["privacy"]["sample"]["noise"] == "local"
    validate(upgraded)
