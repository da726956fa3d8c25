"""`flwr run .` on a local simulation, step by step as the README shows it: a SuperLink that
runs simulations itself (deploy/fedpriv-deploy.sh simulation-link, 127.0.0.1 only), its
connection in a private FLWR_HOME, and a 2-round tiny_bert run whose Hydra overrides travel
in the run-config key `overrides`. The SuperLink is stopped by its pid, here.

One run of ~45 s on 2 cores (one Ray actor serves both simulated clients, as ONE_ACTOR does
for `fedpriv simulate`) carries every check: the run directory lands under
$FEDPRIV_RUNS_DIR for a relative `hydra.run.dir`, as the README says; the report files are
those of `fedpriv simulate`; both clients trained, their ledgers under the run's state_dir.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy" / "fedpriv-deploy.sh"
BIN = Path(sys.executable).parent
# One actor, as ONE_ACTOR for `fedpriv simulate`: both simulated clients share its imports.
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_flwr_run_on_a_local_simulation_writes_the_report(tmp_path):
    procs, runs = tmp_path / "procs", tmp_path / "runs"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PYTHONPATH": str(ROOT),
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FEDPRIV_BIN": str(BIN),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FEDPRIV_RUNS_DIR": str(runs),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port = free_port()

    def deploy(*args):
        out = subprocess.run(
            ["bash", str(DEPLOY), *map(str, args)], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    overrides = " ".join([*FAST, "num_clients=2", "rounds=2", "hydra.run.dir=sim-run"])
    link_pid = None
    try:
        deploy("simulation-link", procs, port)
        link_pid = int((procs / "superlink.pid").read_text())
        deploy("connection", "local-sim", f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not healthy(port):
            assert time.monotonic() < deadline, (procs / "superlink.log").read_text()[-3000:]
            time.sleep(0.5)
        run = subprocess.run(
            [
                BIN / "flwr",
                "run",
                ".",
                "local-sim",
                "--stream",
                "--federation-config",
                FEDERATION,
                "--run-config",
                f'overrides="{overrides}"',
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["bash", str(DEPLOY), "stop", str(procs)], env=env, capture_output=True, timeout=90)
    with pytest.raises(ProcessLookupError):
        os.kill(link_pid, 0)  # stopped by its pid, not left running as Flower's own local SuperLink is

    log = run.stdout + run.stderr
    run_dir = runs / "sim-run"  # a relative hydra.run.dir goes under $FEDPRIV_RUNS_DIR
    assert f"fedpriv: run directory {run_dir}" in log, log[-3000:]
    assert (run_dir / "privacy_report.json").exists(), log[-3000:]
    for name in (
        "privacy_report.md",
        "privacy_report.html",
        "clients_reported.json",
        ".hydra/config.yaml",
        "plots/epsilon_per_round.png",
        "plots/accuracy_per_round.png",
        "checkpoints/manifest.json",
    ):
        assert (run_dir / name).exists(), name
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["clients_trained"] for r in rounds] == [2, 2]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    clients = {c["client_id"]: c for c in report["sample_level"]["clients"]}
    assert set(clients) == {"0", "1"}  # partition ids, as in `fedpriv simulate`
    for cid, client in clients.items():
        assert client["rounds_participated"] == 2 and 0 < client["epsilon"] <= client["budget_epsilon"]
        # Simulated clients share the server's machine: state_dir defaults to <run dir>/clients.
        assert (run_dir / "clients" / cid / "ledger.json").exists()
    assert report["config"]["num_clients"] == 2 and report["config"]["rounds"] == 2
