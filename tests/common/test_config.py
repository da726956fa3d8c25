"""Config validation names the bad setting; every config group composes and validates."""

from pathlib import Path

import pytest

from common.config import validate, validate_partitions
from common.errors import ConfigError
from tests.conftest import FAST, ROOT, compose

GROUPS = ["model", "data", "partition", "privacy", "strategy", "train"]


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_group_composes_and_validates(tmp_path, group, option):
    extra = {"data/csv": ["data.path=x.csv", "data.text_column=text", "data.label_column=label"],
             "data/hf": ["data.name=x", "data.text_column=text", "data.label_column=label"]}
    cfg = compose([f"{group}={option}", *extra.get(f"{group}/{option}", [])], tmp_path)
    validate(cfg)
    if group == "model":
        assert cfg["model"]["_target_"] == "common.model.build_model"


def test_every_model_option_builds(tmp_path):
    from common.model import count_parameters, instantiate_model

    for option in options("model"):
        cfg = compose([f"model={option}"], tmp_path)
        trainable, total = count_parameters(instantiate_model(cfg, num_labels=3))
        assert 0 < trainable < total


@pytest.mark.parametrize("override,setting", [
    ("privacy.sample.epsilon=-1", "privacy.sample.epsilon"),
    ("privacy.sample.epsilon=0", "privacy.sample.epsilon"),
    ("privacy.sample.delta=1.5", "privacy.sample.delta"),
    ("privacy.sample.delta=0", "privacy.sample.delta"),
    ("privacy.sample.max_grad_norm=0", "privacy.sample.max_grad_norm"),
    ("privacy.sample.accountant=gdp", "privacy.sample.accountant"),
    ("+privacy.sample.client_budgets.0=-2", "privacy.sample.client_budgets.0"),
    ("privacy.mode=weird", "privacy"),
    ("num_clients=0", "num_clients"),
    ("rounds=0", "rounds"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.local_epochs=1.5", "train.local_epochs"),
    ("train.optimizer=lion", "train.optimizer"),
    ("train.device=tpu", "train.device"),
    ("strategy.fraction_train=1.5", "strategy.fraction_train"),
    ("secagg=maybe", "secagg"),
])
def test_bad_values_name_the_setting(tmp_path, override, setting):
    cfg = compose([*FAST, override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting
    assert str(err.value).startswith(setting)


@pytest.mark.parametrize("override, setting", [
    ("privacy.client.clipping=sometimes", "privacy.client.clipping"),
    ("privacy.client.clipping_norm=0", "privacy.client.clipping_norm"),
    ("privacy.client.epsilon=-1", "privacy.client.epsilon"),
    ("privacy.client.delta=1.0", "privacy.client.delta"),
    ("privacy.client.noise_multiplier=-0.5", "privacy.client.noise_multiplier"),
    ("privacy.client.noise_multiplier=0", "privacy.client.noise_multiplier"),
    ("privacy.client.target_quantile=1.5", "privacy.client.target_quantile"),
    ("privacy.client.clip_lr=0", "privacy.client.clip_lr"),
    # σ = 1 needs a clipped-count noise above σ/2 (Andrew et al.'s split).
    ("privacy.client.clipped_count_stddev=0.4", "privacy.client.clipped_count_stddev"),
])
def test_bad_client_level_values_name_the_setting(tmp_path, override, setting):
    cfg = compose([*FAST, "privacy=both", "privacy.client.clipping=adaptive", "privacy.client.noise_multiplier=1.0",
                   override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


@pytest.mark.parametrize("override, setting", [
    ("secaggplus.num_shares=2", "secaggplus.num_shares"),
    ("secaggplus.reconstruction_threshold=1.5", "secaggplus.reconstruction_threshold"),
    ("secaggplus.reconstruction_threshold=9", "secaggplus.reconstruction_threshold"),
    ("secaggplus.modulus_range=1000", "secaggplus.modulus_range"),
    ("strategy.fraction_train=0.25", "strategy.fraction_train"),
])
def test_bad_secagg_values_name_the_setting(tmp_path, override, setting):
    cfg = compose([*FAST, "secagg=true", "num_clients=4", override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


def test_client_and_secagg_defaults_validate(tmp_path):
    validate(compose([*FAST, "privacy=both", "secagg=true", "num_clients=4"], tmp_path))
    validate(compose([*FAST, "privacy=client", "privacy.client.clipping=adaptive"], tmp_path))


def test_client_level_delta_is_checked_against_num_clients(tmp_path):
    cfg = compose([*FAST, "privacy=client", "num_clients=4", "privacy.client.delta=0.3"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_partitions(cfg, [100] * 4)
    assert err.value.setting == "privacy.client.delta" and "1/num_clients" in str(err.value)
    cfg["privacy"]["client"]["delta"] = 0.05  # below 1/4, above 1/40
    with pytest.warns(UserWarning, match="privacy.client.delta"):
        assert validate_partitions(cfg, [100] * 4)


def test_delta_must_be_below_one_over_smallest_client(tmp_path):
    cfg = compose([*FAST, "num_clients=2"], tmp_path)
    validate_partitions(cfg, [100, 200])
    cfg["privacy"]["sample"]["delta"] = 0.03
    with pytest.raises(ConfigError) as err:
        validate_partitions(cfg, [40, 200])
    assert err.value.setting == "privacy.sample.delta" and "n = 40" in str(err.value)


def test_weak_delta_warns(tmp_path):
    cfg = compose([*FAST, "num_clients=2"], tmp_path)
    cfg["privacy"]["sample"]["delta"] = 1e-3
    with pytest.warns(UserWarning, match="privacy.sample.delta"):
        notes = validate_partitions(cfg, [500, 600])
    assert notes


def test_empty_partition_and_oversized_batch(tmp_path):
    cfg = compose([*FAST, "num_clients=2"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_partitions(cfg, [10, 0])
    assert err.value.setting == "partition"
    with pytest.raises(ConfigError) as err:
        validate_partitions(cfg, [10, 200])
    assert err.value.setting == "train.batch_size"


def test_unknown_csv_column_is_named_by_prepare(tmp_path):
    from server.loop import prepare

    csv_path = Path(tmp_path) / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"hello {i},{i % 2}\n" for i in range(40)))
    cfg = compose(["model=tiny_bert", "num_clients=2", "data=csv", f"data.path={csv_path}", "data.text_column=body",
                   "data.label_column=label", "data.test_fraction=0.25"], tmp_path)
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert err.value.setting == "data.text_column"


@pytest.mark.parametrize("overrides,setting", [
    (["model.name_or_path=/nonexistent/encoder"], "model.name_or_path"),
    (["data=csv", "data.path=/nonexistent/train.csv", "data.text_column=text", "data.label_column=label"],
     "data.path"),
    (["train.batch_size=5000"], "train.batch_size"),
    (["privacy.sample.delta=0.1"], "privacy.sample.delta"),
    (["train.grad_sample_mode=ghost", "train.max_physical_batch_size=8"], "train.max_physical_batch_size"),
])
def test_prepare_names_the_setting_before_training(tmp_path, overrides, setting):
    from server.loop import prepare

    base = ["model=tiny_bert", "num_clients=2"] + ([] if "data=csv" in overrides else ["data.train_size=400"])
    with pytest.raises(ConfigError) as err:
        prepare(compose([*base, *overrides], tmp_path))
    assert err.value.setting == setting


@pytest.mark.parametrize("overrides,setting", [
    (["strategy.name=fedprox"], "strategy.name"),
    (["strategy=fedavgm", "strategy.server_momentum=1.0"], "strategy.server_momentum"),
    (["strategy=fedavgm", "strategy.server_momentum=-0.1"], "strategy.server_momentum"),
    (["strategy=fedavgm", "strategy.server_lr=0"], "strategy.server_lr"),
    (["strategy=fedadam", "strategy.beta_1=1.0"], "strategy.beta_1"),
    (["strategy=fedadam", "strategy.beta_1=-0.5"], "strategy.beta_1"),
    (["strategy=fedadam", "strategy.beta_2=1.5"], "strategy.beta_2"),
    (["strategy=fedadam", "strategy.tau=0"], "strategy.tau"),
    (["strategy=fedadam", "strategy.tau=null"], "strategy.tau"),
    (["strategy=fedadam", "strategy.server_lr=-1"], "strategy.server_lr"),
])
def test_bad_server_optimizer_values_name_the_setting(tmp_path, overrides, setting):
    cfg = compose([*FAST, *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


def test_every_strategy_option_has_fedavgs_keys(tmp_path):
    base = set(compose(["strategy=fedavg"], tmp_path)["strategy"])
    for option in options("strategy"):
        strategy = compose([f"strategy={option}"], tmp_path)["strategy"]
        assert base <= set(strategy) and strategy["name"] == option
        validate(compose([*FAST, f"strategy={option}"], tmp_path))
