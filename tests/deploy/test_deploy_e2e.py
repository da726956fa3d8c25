"""Deployment end to end on loopback: Flower's own SuperLink and SuperNodes, TLS and
SuperNode authentication, set up with deploy/fedpriv-deploy.sh.

One run of 3 rounds carries every check (~70 s in all on 2 cores; SuperNodes poll every 3 s):
- each SuperNode's messages run in processes forked by its launcher, fedpriv-superexec
  (client/launcher.py), the deploy script's default; the stopped alice's launcher ends with it;
- two registered SuperNodes train; an unregistered one is refused at activation and
  nothing from it reaches the server;
- SuperNode "alice" is stopped and restarted (new process, same state-dir) after
  round 1: its ε continues upward from its ledger, never restarts at 0;
- SuperNode "device-1" has a node-config max-epsilon below the run's budget: it
  trains round 1, then declines;
- ledgers sit under each SuperNode's state-dir, none under the server's run dir.
Every process is started through the deploy script and stopped by its pid.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from common.privacy.accounting import calibrate_noise, epsilon, sample_rate, steps_per_epoch
from tests.conftest import FAST, ROOT, compose

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy" / "fedpriv-deploy.sh"
BIN = Path(sys.executable).parent
ROUNDS = 3
RUN_OVERRIDES = [*FAST, "num_clients=2", f"rounds={ROUNDS}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_epsilons(tmp_path: Path) -> list[float]:
    """ε after rounds 1..ROUNDS for a client of this run (independent of the client code)."""
    cfg = compose(RUN_OVERRIDES, tmp_path / "calc")
    n = cfg["data"]["train_size"] // 2  # iid over 2 clients
    batch = cfg["train"]["batch_size"]
    q, steps = sample_rate(n, batch), steps_per_epoch(n, batch)
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps * ROUNDS)
    return [epsilon([(sigma, q, steps * r)], 1e-5) for r in range(1, ROUNDS + 1)]


def test_tls_auth_restart_and_device_cap(tmp_path):
    eps = round_epsilons(tmp_path)
    device_cap = round((eps[0] + eps[1]) / 2, 3)  # allows round 1, not round 2
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FEDPRIV_BIN": str(BIN),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    procs, pki, run_dir = tmp_path / "procs", tmp_path / "pki", tmp_path / "run"
    port = free_port()
    link = f"127.0.0.1:{port}"

    def deploy(*args, timeout=60):
        out = subprocess.run(
            ["bash", str(DEPLOY), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def supernode(name, node_config):
        deploy("supernode", procs, name, link, free_port(), node_config, pki / "ca.crt", pki / name)
        return int((procs / f"{name}.pid").read_text())

    state = {name: tmp_path / "devices" / name for name in ("alice", "n1", "rogue")}
    configs = {
        "alice": f'partition-id=0 num-partitions=2 client-id="alice" state-dir="{state["alice"]}"',
        "n1": f'partition-id=1 num-partitions=2 client-id="device-1" state-dir="{state["n1"]}" '
        f"max-epsilon={device_cap}",
        "rogue": f'partition-id=1 num-partitions=2 client-id="rogue" state-dir="{state["rogue"]}"',
    }
    flwr_run = None
    try:
        deploy("certs", pki, "127.0.0.1", "localhost")
        for name in configs:
            deploy("node-key", pki, name)
        deploy("superlink", procs, "127.0.0.1", port, pki)
        deploy("connection", "e2e", link, pki / "ca.crt")
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [BIN / "flwr", "supernode", "list", "e2e"], env=env, capture_output=True, timeout=30
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, (procs / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        deploy("register", pki / "alice.pub", "e2e")
        deploy("register", pki / "n1.pub", "e2e")  # rogue's key is never registered

        alice_pid = supernode("alice", configs["alice"])
        alice_launcher_pid = int((procs / "alice-launcher.pid").read_text())
        supernode("n1", configs["n1"])
        rogue_pid = supernode("rogue", configs["rogue"])

        overrides = " ".join([*RUN_OVERRIDES, f"hydra.run.dir={run_dir}"])
        flwr_run = subprocess.Popen(
            [BIN / "flwr", "run", str(ROOT), "e2e", "--stream", "--run-config", f'overrides="{overrides}"'],
            env=env,
            stdout=open(tmp_path / "flwr-run.log", "w"),
            stderr=subprocess.STDOUT,
        )

        # Restart alice between rounds: as soon as round 1 is complete and saved.
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert flwr_run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not complete in 180 s"
            time.sleep(0.5)
        deploy("stop", procs, "alice")
        new_alice_pid = supernode("alice", configs["alice"])
        assert new_alice_pid != alice_pid

        flwr_run.wait(timeout=240)
        log = (tmp_path / "flwr-run.log").read_text()
        assert flwr_run.returncode == 0, log[-3000:]

        # The unregistered SuperNode was refused at activation and gave up.
        rogue_log = (procs / "rogue.log").read_text()
        assert "Failed to activate SuperNode" in rogue_log
        with pytest.raises(ProcessLookupError):
            os.kill(rogue_pid, 0)
        assert "Receiving: train message" not in rogue_log
        assert not state["rogue"].exists() or not list(state["rogue"].rglob("ledger.json"))
        new_alice_log = (procs / "alice.log").read_text()
        assert "Receiving: train message" in new_alice_log  # the restarted process trained
        # Every message a SuperNode received ran in a fork of its launcher, none in flwr-clientapp.
        for name in ("alice", "n1"):
            received = (procs / f"{name}.log").read_text().count("Receiving: train message")
            forked = (procs / f"{name}-launcher.log").read_text().count("runs in process")
            assert received >= 1 and forked == received, (name, received, forked)
        with pytest.raises(ProcessLookupError):
            os.kill(alice_launcher_pid, 0)  # stopped with its SuperNode
    finally:
        if flwr_run is not None and flwr_run.poll() is None:
            flwr_run.kill()
            flwr_run.wait(timeout=30)
        subprocess.run(["bash", str(DEPLOY), "stop", str(procs)], env=env, capture_output=True, timeout=90)

    report = json.loads((run_dir / "privacy_report.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(1, ROUNDS + 1))
    clients = {c["client_id"]: c for c in report["sample_level"]["clients"]}
    assert set(clients) == {"alice", "device-1"}  # nothing from the rogue node
    for m in lines:
        assert set(m["declined"]) <= {"device-1"}
        assert not any("rogue" in who for who in m["rejected"])
    assert lines[0]["clients_trained"] == 2

    # alice: trained before and after its restart; ε only grows, recomputable from history.
    alice = clients["alice"]
    trained = [r["round"] for r in alice["per_round"]]
    assert trained[0] == 1 and trained[-1] == ROUNDS
    per_round = [r["epsilon"] for r in alice["per_round"]]
    assert per_round == sorted(per_round) and per_round[-1] > per_round[0] > 0
    assert alice["per_round"][0]["epsilon"] == pytest.approx(eps[0], abs=1e-9)
    ledger = json.loads((state["alice"] / "alice" / "ledger.json").read_text())
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in ledger["history"]]
    assert acc.get_epsilon(1e-5) == pytest.approx(alice["epsilon"], abs=1e-9)
    assert ledger["rounds"][0]["round"] == 1 and ledger["rounds"][-1]["round"] == ROUNDS

    # device-1: its own cap (below the run's 8) wins; it declines once reached.
    dev = clients["device-1"]
    assert dev["budget_epsilon"] == pytest.approx(device_cap)
    assert [r["round"] for r in dev["per_round"]] == [1]
    assert dev["rounds_declined"] == ROUNDS - 1 and dev["exhausted"]
    assert dev["epsilon"] <= device_cap
    assert [m["declined"].get("device-1") for m in lines[1:]] == ["budget"] * (ROUNDS - 1)

    # Ledgers live on the devices, never under the server's run directory.
    assert (state["n1"] / "device-1" / "ledger.json").exists()
    assert not list(run_dir.rglob("ledger.json"))
    assert json.loads((run_dir / "clients_reported.json").read_text())["clients"].keys() == {"alice", "device-1"}
