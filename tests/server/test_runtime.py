"""server/runtime/superlink.py and serve.py without a SuperLink: what `fedpriv simulate` hands
Flower's simulation runtime (federation config, environment, app bundle) and the spec the ServerApp accepts. The runs
themselves are the e2e tests' (tests/server/test_simulate_e2e.py, test_faults_e2e.py)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from server.runtime import serve
from server.runtime import superlink as runtime
from server.runtime.pinning import CLIENT_APP, ROOT
from server.runtime.simulate import backend_config
from tests.conftest import compose


def test_the_federation_config_is_the_engines_backend(tmp_path):
    cfg = compose(
        ["num_clients=3", "simulation.num_cpus=2", "simulation.cpus_per_client=1", "simulation.gpus_per_client=0.5"],
        tmp_path,
    )
    assert runtime.federation_config(cfg, backend_config(cfg)) == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.5 init-args-num-cpus=2"
    )
    joined = compose(["num_clients=3", "federation.ray_address=auto"], tmp_path)
    config = runtime.federation_config(joined, backend_config(joined))
    assert "init-args-num-cpus" not in config  # the cluster owns its CPUs


def test_ray_stays_on_loopback_unless_a_cluster_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "somewhere:6379")  # never inherited
    local = runtime.child_env(compose([], tmp_path), tmp_path / "home")
    assert local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    # Flower's ray.init() gets no address from the federation config: "local" makes it start a
    # new Ray instead of joining a `ray start --head` or the one a stale record names.
    assert local["RAY_ADDRESS"] == "local"
    assert local["FLWR_HOME"] == str(tmp_path / "home")
    assert local["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # children import this tree's fedpriv
    cluster = runtime.child_env(compose(["federation.ray_address=ray://head:10001"], tmp_path), tmp_path)
    assert cluster["RAY_ADDRESS"] == "ray://head:10001" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cluster


@pytest.mark.parametrize("client_app", [CLIENT_APP, "tests.server.fault_apps:faulty"])
def test_the_app_bundle_names_the_server_app_and_the_chosen_client_app(tmp_path, client_app):
    from flwr.common.config import validate_config

    text = runtime._PYPROJECT.format(
        serverapp=json.dumps("server.app:app"),
        clientapp=json.dumps(client_app),
        key=json.dumps(serve.SPEC_KEY),
        spec=json.dumps(str(tmp_path / "s.json")),
    )
    config = tomllib.loads(text)
    valid, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path)
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": client_app}
    assert config["tool"]["flwr"]["app"]["config"][serve.SPEC_KEY] == str(tmp_path / "s.json")


def test_a_spec_outside_a_private_folder_is_refused(tmp_path):
    import tempfile

    private = Path(tempfile.mkdtemp(dir=tmp_path))
    (private / "spec.json").write_text(json.dumps({"run_dir": "x"}))
    assert serve.load_spec(str(private / "spec.json")) == {"run_dir": "x"}
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "spec.json").write_text("{}")
    with pytest.raises(PermissionError, match=serve.SPEC_KEY):
        serve.load_spec(str(shared / "spec.json"))


def test_the_runtime_setting_is_checked(tmp_path):
    from common.config.validate import validate
    from common.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(["simulation.runtime=ray"], tmp_path))
    assert err.value.setting == "simulation.runtime"


def test_files_are_named_from_the_working_directory_of_fedpriv_simulate(tmp_path, monkeypatch):
    # Flower's simulation process runs in a private folder: a relative data file (the
    # benchmarks' ../shared/data/...) must reach it as the path the user meant.
    (tmp_path / "data.csv").write_text("text,label\nhi,a\n")
    (tmp_path / "encoder").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = compose(
        ["data=csv", "data.path=data.csv", "data.test_path=data.csv", "model.name_or_path=encoder"], tmp_path / "run"
    )
    out = runtime.absolute_paths(cfg)
    assert out["data"]["path"] == out["data"]["test_path"] == str(tmp_path / "data.csv")
    assert out["model"]["name_or_path"] == str(tmp_path / "encoder")
    assert runtime.absolute_paths(compose([], tmp_path / "run"))["model"]["name_or_path"] == "minilm"  # a name
    assert cfg["data"]["path"] == "data.csv"  # the caller's config is left as it was


@pytest.mark.e2e  # starts a process
def test_at_the_end_the_simulation_process_is_killed_with_what_it_started(tmp_path):
    import subprocess
    import sys
    import time

    # A stand-in for Flower's simulation process (one was found stuck in its exit), with a child (Ray).
    stuck = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "time.sleep(600)",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not serve.descendants(stuck.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        below = serve.descendants(stuck.pid)
        (tmp_path / serve.SERVER).write_text(json.dumps({"pid": stuck.pid, "start": serve.started(stuck.pid)}))
        runtime._end_serverapp(tmp_path)
        assert stuck.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while any(serve.started(pid) for pid in below):  # reparented and reaped by init
            assert time.monotonic() < deadline, below
            time.sleep(0.05)
    finally:
        stuck.kill()


def test_a_reused_pid_is_not_the_process_that_was_watched():
    me = os.getpid()
    assert serve.alive(me, serve.started(me))
    assert not serve.alive(me, "0")  # same pid, another start: not the watched process


@pytest.mark.e2e  # starts a process
def test_a_killed_runs_private_folder_is_swept_into_its_cli_log_by_the_next_run(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(runtime.tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a `fedpriv simulate` that was SIGKILLed: no time to remove its folder

    def folder(name: str, pid: int, start: str | None) -> tuple[Path, Path]:
        work, run_dir = tmp_path / f"fedpriv-simulate-{name}", tmp_path / f"run-{name}"
        work.mkdir()
        run_dir.mkdir()
        (run_dir / "cli.log").write_text("earlier lines\n")
        (work / "spec.json").write_text(json.dumps({"watch_pid": pid, "watch_start": start, "run_dir": str(run_dir)}))
        (work / "superlink.log").write_text(f"Starting Flower SuperLink {name}\n")
        (work / "flwr-run.log").write_text(f"flwr run {name}\n")
        return work, run_dir

    killed, killed_run = folder("killed", dead_pid, "1")
    reused, _ = folder("reused", os.getpid(), "0")  # its pid now belongs to another process
    alive, alive_run = folder("alive", os.getpid(), serve.started(os.getpid()))
    elsewhere, _ = folder("target", dead_pid, "1")
    elsewhere = elsewhere.rename(tmp_path / "elsewhere")
    (tmp_path / "fedpriv-simulate-link").symlink_to(elsewhere)  # a link is never followed
    runtime.sweep_orphans()
    assert (elsewhere / "spec.json").exists() and (tmp_path / "fedpriv-simulate-link").is_symlink()
    assert not killed.exists() and not reused.exists() and not list(tmp_path.glob("*.swept"))
    log = (killed_run / "cli.log").read_text()
    assert log.startswith("earlier lines\n")  # appended, nothing lost
    assert "Starting Flower SuperLink killed" in log and "flwr run killed" in log
    assert alive.exists() and (alive_run / "cli.log").read_text() == "earlier lines\n"  # a live run's is its own
