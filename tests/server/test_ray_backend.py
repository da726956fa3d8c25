"""`fedpriv simulate` joins an existing Ray cluster with federation.ray_address, and starts a
private one without it, whatever other Ray runs on the machine."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server.runtime import superlink as runtime
from server.runtime.pinning import ROOT
from server.runtime.simulate import backend_config, server_threads
from tests.conftest import compose


def test_local_ray_by_default(tmp_path):
    cfg = compose(["model=tiny_bert"], tmp_path / "run")
    assert cfg["federation"]["ray_address"] is None
    backend = backend_config(cfg)
    assert backend["init_args"]["_node_ip_address"] == "127.0.0.1"
    assert backend["init_args"]["num_cpus"] >= 1
    # A new Ray even where `ray start --head` runs (ray.init() with no address would join it,
    # then refuse num_cpus); an explicit address also outranks an inherited RAY_ADDRESS.
    assert backend["init_args"]["address"] == "local"
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_existing_cluster(tmp_path):
    before = os.environ.get("RAY_ADDRESS")
    cfg = compose(
        ["model=tiny_bert", "federation.ray_address=auto", "simulation.gpus_per_client=0.5"], tmp_path / "run"
    )
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


# What Flower's Ray backend does with each runtime's settings, in a process of its own: the
# engine runtime hands ray.init backend_config's init_args; the SuperLink runtime can hand it
# only the federation config's num_cpus, in the environment child_env builds.
PROBE = """
import json, sys, ray
ray.init(**json.loads(sys.argv[1]))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize("simulation_runtime", ["engine", "superlink"])
def test_a_private_ray_never_joins_the_cluster_a_dead_one_recorded(tmp_path, simulation_runtime):
    """The record `ray start --head` leaves in <temp dir>/ray/ray_current_cluster (still there when
    it died) is what ray.init() with no address joins. Ray's temp dir is this test's own
    (RAY_TMPDIR, short for Ray's socket paths), so no Ray of anyone else's is seen or touched."""
    cfg = compose(["model=tiny_bert", "simulation.num_cpus=1"], tmp_path / "run")
    backend = backend_config(cfg)
    temp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")
    try:
        record = Path(temp, "ray", "ray_current_cluster")
        record.parent.mkdir()
        record.write_text("127.0.0.1:9")  # a dead cluster's address
        if simulation_runtime == "engine":
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            init_args = backend["init_args"]
        else:
            env = runtime.child_env(cfg, tmp_path / "home")
            init_args = {"num_cpus": backend["init_args"]["num_cpus"], "include_dashboard": False}
        env.update(RAY_TMPDIR=temp, PYTHONPATH=str(ROOT))
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, json.dumps(init_args)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = probe.communicate(timeout=60)
        finally:
            if probe.poll() is None:
                os.killpg(probe.pid, signal.SIGKILL)  # the probe's session: its Ray, nobody else's
                probe.wait()
        assert probe.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["gcs"] != "127.0.0.1:9"
        assert record.read_text() == "127.0.0.1:9"
    finally:
        shutil.rmtree(temp, ignore_errors=True)
