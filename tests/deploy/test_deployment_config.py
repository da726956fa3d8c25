"""The `flwr run` side without processes: config from `overrides`, absolute run dir,
no server-side ledgers, devices reading their own files with the run's labels."""

import csv

import pytest

from client.privacy.node_config import ClientIdentity
from client.round import run_round
from common.data.sources import load_local_data
from common.errors import ConfigError
from common.model.factory import instantiate_model
from common.model.state import trainable_state
from server.runtime.deployment import check_simulated_nodes, deployment_config, prepare_deployment
from tests.conftest import FAST


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["msg", "y"])
        writer.writerows(rows)
    return path


def test_relative_run_dir_goes_under_the_runs_base_and_no_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_RUNS_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)  # not where the SuperLink happened to start
    cfg, run_dir = deployment_config(" ".join([*FAST, "hydra.run.dir=runs/a"]))
    assert run_dir == tmp_path / "base" / "runs" / "a"
    assert cfg["state_dir"] is None  # the server never holds ledgers
    cfg, run_dir = deployment_config(f"model=tiny_bert hydra.run.dir={tmp_path}/abs state_dir=shared")
    assert run_dir == tmp_path / "abs"
    assert cfg["state_dir"] == str(tmp_path / "base" / "shared")  # explicit: kept (a local simulation)


def test_a_local_simulation_keeps_ledgers_beside_the_run_and_needs_num_clients_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_RUNS_DIR", str(tmp_path / "base"))
    cfg, run_dir = deployment_config(" ".join([*FAST, "num_clients=3", "hydra.run.dir=sim"]), simulated=True)
    assert run_dir == tmp_path / "base" / "sim"
    assert cfg["state_dir"] == str(run_dir / "clients")  # as `fedpriv simulate`: the same machine
    check_simulated_nodes(cfg, [11, 12, 13])
    for nodes in ([11, 12], [11, 12, 13, 14]):
        with pytest.raises(ConfigError, match="num-supernodes=3") as err:
            check_simulated_nodes(cfg, nodes)
        assert err.value.setting == "num_clients"


def test_server_without_training_data_and_a_device_file(tmp_path):
    test_file = write_csv(tmp_path / "test.csv", [["refund my card", "billing"], ["parcel late", "delivery"]])
    device_file = write_csv(
        tmp_path / "device.csv",
        [[f"where is my parcel {i}", "delivery"] for i in range(30)]
        + [[f"charge on my bill {i}", "billing"] for i in range(30)],
    )
    base = [
        "model=tiny_bert",
        "recipe=finetune",
        "model.freeze_encoder=false",
        "train.batch_size=16",
        "data=csv",
        "data.text_column=msg",
        "data.label_column=y",
        "num_clients=2",
        "rounds=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    cfg, _ = deployment_config(" ".join([*base, f"data.path={tmp_path / 'absent.csv'}"]))
    with pytest.raises(ConfigError, match="data.labels"):
        prepare_deployment(cfg)
    labels = "data.labels=[account,billing,delivery]"
    cfg, _ = deployment_config(" ".join([*base, f"data.path={tmp_path / 'absent.csv'}", labels]))
    with pytest.raises(ConfigError, match="data.test_path"):
        prepare_deployment(cfg)
    cfg, _ = deployment_config(" ".join([*base, f"data.test_path={test_file}", labels]))
    prepared = prepare_deployment(cfg)
    assert prepared.label_names == ["account", "billing", "delivery"] and len(prepared.test) == 2
    assert cfg["data"]["labels"] == prepared.label_names  # travels to every device

    ds, names = load_local_data(cfg, device_file)
    assert names == prepared.label_names and sorted(set(ds["label"])) == [1, 2]  # the run's ids, not local ones
    bad = write_csv(tmp_path / "bad.csv", [["hello", "spam"]])
    with pytest.raises(ConfigError, match="node-config data-path.*spam"):
        load_local_data(cfg, bad)

    # A device trains on its own file; its ledger goes to its own state dir.
    weights = trainable_state(instantiate_model(cfg, len(names)))
    who = ClientIdentity("dev-a", 0, str(tmp_path / "device-state"), data_path=str(device_file))
    out = run_round(cfg, who, run_id="r", server_round=1, global_state=weights)
    assert not out.declined and out.privacy["rounds_participated"] == 1
    assert (tmp_path / "device-state" / "dev-a" / "ledger.json").exists()


def test_deployment_refuses_a_recipe_the_model_cannot_run(tmp_path):
    """The default recipe reads pooled features; pooling=pooler is BERT's plain classifier,
    so the server refuses before any device trains, naming model.pooling."""
    test_file = write_csv(tmp_path / "test.csv", [["refund my card", "billing"], ["parcel late", "delivery"]])
    cfg, _ = deployment_config(
        " ".join(
            [
                "model=tiny_bert",
                "model.pooling=pooler",
                "model.normalize=null",
                "model.freeze_encoder=false",
                "data=csv",
                "data.text_column=msg",
                "data.label_column=y",
                "num_clients=2",
                "rounds=2",
                f"data.test_path={test_file}",
                "data.labels=[billing,delivery]",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    )
    with pytest.raises(ConfigError) as err:
        prepare_deployment(cfg)
    assert err.value.setting == "model.pooling"
