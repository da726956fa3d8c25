"""`fedpriv simulate` joins an existing Ray cluster with federation.ray_address."""

import os

from server.cli import backend_config, server_threads
from tests.conftest import compose


def test_local_ray_by_default(tmp_path):
    cfg = compose(["model=tiny_bert"], tmp_path / "run")
    assert cfg["federation"]["ray_address"] is None
    backend = backend_config(cfg)
    assert backend["init_args"]["_node_ip_address"] == "127.0.0.1"
    assert backend["init_args"]["num_cpus"] >= 1
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_existing_cluster(tmp_path):
    before = os.environ.get("RAY_ADDRESS")
    cfg = compose(["model=tiny_bert", "federation.ray_address=auto", "simulation.gpus_per_client=0.5"],
                  tmp_path / "run")
    backend = backend_config(cfg)
    # Connecting to a cluster: ray.init refuses num_cpus, and the cluster owns its resources.
    assert backend["init_args"] == {"address": "auto", "include_dashboard": False}
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert os.environ.get("RAY_ADDRESS") == before  # no process-wide side effect


def test_server_threads_follow_the_simulation_budget(tmp_path):
    assert server_threads(compose(["model=tiny_bert"], tmp_path / "a")) is None  # all cores: torch's default
    assert server_threads(compose(["model=tiny_bert", "simulation.num_cpus=1"], tmp_path / "b")) == 1
    joined = compose(["model=tiny_bert", "simulation.num_cpus=1", "federation.ray_address=auto"], tmp_path / "c")
    assert server_threads(joined) is None  # the cluster's CPUs are not this machine's
