"""Config validation names the bad setting; every config group composes and validates."""

import copy
from pathlib import Path

import pytest

from common.config import schema
from common.config.validate import validate, validate_partitions
from common.errors import ConfigError
from tests.conftest import FAST, ROOT, compose

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
#: What an option needs set on the command line (its ??? keys).
EXTRA = {
    "data/csv": ["data.path=x.csv", "data.text_column=text", "data.label_column=label"],
    "data/hf": ["data.name=x", "data.text_column=text", "data.label_column=label"],
    "data/conll": ["data.path=x.conll", "task=token_classification"],
    "data/hf_tokens": ["data.name=x", "task=token_classification"],
    "data/preferences": ["data.path=x.csv"],
    "task/token_classification": ["data=conll", "data.path=x.conll"],
}


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_"))


EVERY_OPTION = [(g, o) for g in GROUPS for o in options(g)]


def compose_option(group, option, tmp_path):
    return compose([f"{group}={option}", *EXTRA.get(f"{group}/{option}", [])], tmp_path)


@pytest.mark.parametrize("group,option", EVERY_OPTION)
def test_every_config_group_composes_and_validates(tmp_path, group, option):
    cfg = compose_option(group, option, tmp_path)
    schema.check(cfg)
    validate(cfg)
    if group == "model":  # nothing in conf/ names code to call: the model is built from typed keys
        assert "_target_" not in cfg["model"]


def test_every_group_is_tested():
    assert {"audit", "data", "model", "partition", "privacy", "recipe", "strategy", "train"} <= set(GROUPS)


def _flat(cfg, prefix=""):
    """Dotted keys of a composed config, down to the schema's free maps."""
    keys = set()
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        if isinstance(value, dict) and dotted not in ("model.config_overrides", "privacy.sample.client_budgets"):
            keys |= _flat(value, dotted + ".")
    return keys


def _schema_keys(spec, prefix=""):
    if isinstance(spec, (schema.Filled, schema.Nullable)):
        return _schema_keys(spec.spec, prefix)
    fields = {}
    if isinstance(spec, schema.Section):
        fields = spec.fields
    elif isinstance(spec, schema.Variant):
        fields = {k: v for option in spec.options.values() for k, v in option.items()}
    keys = set()
    for key, sub in fields.items():
        keys |= {f"{prefix}{key}"} | _schema_keys(sub, f"{prefix}{key}.")
    return keys


def test_the_schema_holds_exactly_the_keys_the_yaml_composes(tmp_path):
    composed = set()
    for group, option in EVERY_OPTION:
        composed |= _flat(compose_option(group, option, tmp_path))
    assert composed == _schema_keys(schema.SCHEMA)


def test_the_schemas_options_are_the_implementations_and_the_config_groups(tmp_path):
    from common.data.partition import _PARTITIONERS
    from common.data.sources import _LOADERS
    from server.round.optimizer import ServerOptimizer

    fields = schema.SCHEMA.fields
    assert set(fields["data"].options) == set(_LOADERS)
    assert set(fields["partition"].options) == set(_PARTITIONERS) == set(options("partition"))
    assert set(schema.STRATEGIES) == {cls.name for cls in ServerOptimizer.__subclasses__()} == set(options("strategy"))
    assert set(fields["privacy"].fields["mode"].values) == set(options("privacy"))
    for group in ("partition", "strategy", "privacy"):  # each option names itself
        for option in options(group):
            cfg = compose_option(group, option, tmp_path)[group]
            assert cfg["mode" if group == "privacy" else "name"] == option
    assert compose([], tmp_path)["strategy"]["name"] == "fedavg"  # the default stays plain FedAvg


@pytest.mark.parametrize(
    "model,setting",
    [
        ({"_target_": "builtins.open"}, "model._target_"),
        (
            {"config_overrides": {"payload": {"_target_": "builtins.open", "_args_": ["x", "w"]}}},
            "model.config_overrides.payload",
        ),
        ({"config_overrides": {"trust_remote_code": True}}, "model.config_overrides.trust_remote_code"),
        ({"config_overrides": {"hidden_size": [32]}}, "model.config_overrides.hidden_size"),
    ],
)
def test_no_code_and_no_loader_option_can_be_named_in_the_model(tmp_path, model, setting):
    """What a device validates a server's config with: only scalar, allow-listed model settings."""
    cfg = compose(["model=tiny_bert"], tmp_path)
    cfg["model"].update(model)
    assert_names(cfg, setting)
    with pytest.raises(ConfigError):
        from common.model.factory import instantiate_model

        instantiate_model(cfg, 2)  # the builder refuses them too, whoever calls it


def assert_names(cfg, setting):
    """validate(cfg) stops with one ConfigError that names ``setting`` first."""
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting
    assert str(err.value).startswith(setting)


@pytest.mark.parametrize(
    "overrides,setting",
    [
        # A misspelt key, or one of another option, is no setting at all.
        (["+train.lerning_rate=0.1"], "train.lerning_rate"),
        (["+lerning_rate=0.1"], "lerning_rate"),
        (["+privacy.sample.epsilonn=1"], "privacy.sample.epsilonn"),
        (["+strategy.server_momentum=0.5"], "strategy.server_momentum"),  # fedavgm's key, not fedavg's
        (["+data.delimiter=tab"], "data.delimiter"),  # csv's key, not the synthetic set's
        (["+model.lora_rank=4"], "model.lora_rank"),
        # A value of the wrong type, or not among the allowed ones.
        (["train.lr=fast"], "train.lr"),
        (["train.local_epochs=two"], "train.local_epochs"),
        (["train.batch_size=1.5"], "train.batch_size"),
        (["train.max_length=[8]"], "train.max_length"),
        (["train.optimizer=1"], "train.optimizer"),
        (["train.precision=fp8"], "train.precision"),
        (["train.grad_sample_mode=functorch"], "train.grad_sample_mode"),
        (["model.pretrained=maybe"], "model.pretrained"),
        (["model.pooling=max"], "model.pooling"),
        (["model=minilm_lora", "model.lora.r=one"], "model.lora.r"),
        (["model=minilm_lora", "model.lora.target_modules=[1]"], "model.lora.target_modules"),
        (["data.num_classes=five"], "data.num_classes"),
        (["data.source=parquet"], "data.source"),
        (["partition=dirichlet", "partition.self_balancing=sometimes"], "partition.self_balancing"),
        (["partition=pathological", "partition.class_assignment=shuffled"], "partition.class_assignment"),
        (["strategy=fedadam", "strategy.beta_1=high"], "strategy.beta_1"),
        (["recipe.prototype_scale=big"], "recipe.prototype_scale"),
        (["+privacy.sample.client_budgets.0=lots"], "privacy.sample.client_budgets.0"),
        (["audit.noise=loud"], "audit.noise"),
        (["evaluation.batch_size=all"], "evaluation.batch_size"),
        (["simulation.num_cpus=many"], "simulation.num_cpus"),
        (["simulation.in_flight_per_worker=0"], "simulation.in_flight_per_worker"),
        (["simulation.in_flight_per_worker=1.5"], "simulation.in_flight_per_worker"),
    ],
)
def test_a_misspelt_key_or_a_wrong_typed_value_is_a_config_error_naming_it(tmp_path, overrides, setting):
    assert_names(compose([*FAST, *overrides], tmp_path), setting)


@pytest.mark.parametrize(
    "dotted",
    [
        "train.optimizer",
        "strategy.server_lr",
        "privacy.sample",
        "model.tokenizer",
        "data.ambiguous_fraction",
        "secaggplus",
        "audit",
    ],
)
def test_a_missing_key_is_a_config_error_naming_it(tmp_path, dotted):
    cfg = compose(FAST, tmp_path)
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    del node[last]
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == dotted and "missing" in str(err.value)


def test_the_labels_the_server_fills_into_any_data_group_validate(tmp_path):
    cfg = compose(FAST, tmp_path)  # data=synthetic, which has no labels key of its own
    cfg["data"]["labels"] = ["account", "billing"]  # server.runtime.deployment.prepare_deployment
    validate(cfg)


def test_a_config_written_before_recipes_and_pooling_is_upgraded_to_what_it_did(tmp_path):
    # A resumed old run's .hydra/config.yaml: the schema wants every key, and
    # common.config.upgrade fills each absent one with what that run did.
    from common.config.upgrade import upgrade

    cfg = compose(["model=minilm_lora", "train.batch_size=64"], tmp_path)
    old = copy.deepcopy(cfg)
    del old["recipe"], old["task"], old["simulation"]["runtime"], old["tracking"]
    for key in ("pooling", "normalize", "freeze_encoder", "token_layer"):
        del old["model"][key]
    for key in ("sample_rate", "sample_rate_dp", "sample_rate_no_dp", "outside_weight"):
        del old["train"][key]
    old["model"]["_target_"] = "common.model.build_model"
    with pytest.raises(ConfigError):
        validate(old)
    new = upgrade(old)
    validate(new)
    assert new["recipe"]["name"] == "finetune" and not new["recipe"]["prototypes"]  # every round trained the encoder
    assert (new["model"]["pooling"], new["model"]["freeze_encoder"], new["model"]["token_layer"]) == (
        "pooler",
        False,
        -1,
    )
    assert new["simulation"]["runtime"] == "engine" and "_target_" not in new["model"]
    assert new["tracking"] == {"name": "none", "uri": None}  # no run before tracking went to a tracker
    assert upgrade(cfg) == cfg  # today's config is left as it is


def test_every_model_option_builds(tmp_path):
    from common.model.factory import instantiate_model
    from common.model.state import count_parameters

    for option in options("model"):
        cfg = compose([f"model={option}"], tmp_path)
        trainable, total = count_parameters(instantiate_model(cfg, num_labels=3))
        assert 0 < trainable < total


@pytest.mark.parametrize(
    "override,setting",
    [
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
    ],
)
def test_bad_values_name_the_setting(tmp_path, override, setting):
    assert_names(compose([*FAST, override], tmp_path), setting)


@pytest.mark.parametrize(
    "override, setting",
    [
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
    ],
)
def test_bad_client_level_values_name_the_setting(tmp_path, override, setting):
    cfg = compose(
        [*FAST, "privacy=both", "privacy.client.clipping=adaptive", "privacy.client.noise_multiplier=1.0", override],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


@pytest.mark.parametrize(
    "override, setting",
    [
        ("secaggplus.num_shares=2", "secaggplus.num_shares"),
        ("secaggplus.reconstruction_threshold=1.5", "secaggplus.reconstruction_threshold"),
        ("secaggplus.reconstruction_threshold=9", "secaggplus.reconstruction_threshold"),
        ("secaggplus.modulus_range=1000", "secaggplus.modulus_range"),
        ("strategy.fraction_train=0.25", "strategy.fraction_train"),
        ("secaggplus.num_shares=some", "secaggplus.num_shares"),
        ("secaggplus.reconstruction_threshold=half", "secaggplus.reconstruction_threshold"),
        ("secaggplus.corrupt_fraction=1.0", "secaggplus.corrupt_fraction"),
        ("secaggplus.corrupt_fraction=-0.1", "secaggplus.corrupt_fraction"),
        ("secaggplus.dropout_fraction=0.95", "secaggplus.dropout_fraction"),
        # num_shares: auto gives 4 clients a complete graph of 4 shares: 5 can never be gathered.
        ("secaggplus.reconstruction_threshold=5", "secaggplus.reconstruction_threshold"),
    ],
)
def test_bad_secagg_values_name_the_setting(tmp_path, override, setting):
    cfg = compose([*FAST, "secagg=true", "num_clients=4", override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # num_shares: auto, reconstruction_threshold: auto (the defaults)
        ["secaggplus.num_shares=1.0", "secaggplus.reconstruction_threshold=0.67"],  # every client, as before
        ["secaggplus.num_shares=3", "secaggplus.reconstruction_threshold=2"],
        ["secaggplus.num_shares=0.5", "secaggplus.reconstruction_threshold=auto"],
        ["secaggplus.reconstruction_threshold=3"],
    ],
)
def test_secagg_share_settings_auto_or_explicit_are_accepted(tmp_path, overrides):
    validate(compose([*FAST, "secagg=true", "num_clients=4", *overrides], tmp_path))


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
    from server.round.loop import prepare

    csv_path = Path(tmp_path) / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"hello {i},{i % 2}\n" for i in range(40)))
    cfg = compose(
        [
            "model=tiny_bert",
            "num_clients=2",
            "data=csv",
            f"data.path={csv_path}",
            "data.text_column=body",
            "data.label_column=label",
            "data.test_fraction=0.25",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert err.value.setting == "data.text_column"


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["model.name_or_path=/nonexistent/encoder"], "model.name_or_path"),
        (
            ["data=csv", "data.path=/nonexistent/train.csv", "data.text_column=text", "data.label_column=label"],
            "data.path",
        ),
        (["train.batch_size=5000"], "train.batch_size"),
        (["privacy.sample.delta=0.1"], "privacy.sample.delta"),
        (["train.grad_sample_mode=ghost", "train.max_physical_batch_size=8"], "train.max_physical_batch_size"),
    ],
)
def test_prepare_names_the_setting_before_training(tmp_path, overrides, setting):
    from server.round.loop import prepare

    base = ["model=tiny_bert", "num_clients=2"] + ([] if "data=csv" in overrides else ["data.train_size=400"])
    with pytest.raises(ConfigError) as err:
        prepare(compose([*base, *overrides], tmp_path))
    assert err.value.setting == setting


@pytest.mark.parametrize(
    "overrides,setting",
    [
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
    ],
)
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
