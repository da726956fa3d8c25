"""Faults through the whole loop: a poisoned update, a client killed mid-round, a server
killed between rounds and resumed. Processes are started here and stopped here by pid."""

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from client.privacy.ledger import Ledger
from common.privacy.accounting import calibrate_noise, sample_rate, steps_per_epoch
from tests.conftest import FAST, ONE_ACTOR, child_env, compose, run_fedpriv

pytestmark = pytest.mark.e2e


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def final_weights(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    last = max(int(r) for r in manifest["rounds"])
    return torch.load(run_dir / "checkpoints" / manifest["rounds"][str(last)]["file"], weights_only=True)


def test_poisoned_and_killed_client_do_not_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_fedpriv(
        [
            "simulate",
            *FAST,
            "num_clients=3",
            "rounds=3",
            "round_timeout_s=150",
            "+simulation.client_app=tests.server.fault_apps:faulty",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rounds = metrics(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # Round 1: client 1's NaN update is rejected, counted, and kept out of the model.
    assert rounds[0]["clients_rejected"] == 1 and "1" in rounds[0]["rejected"]
    assert "non-finite" in rounds[0]["rejected"]["1"]
    assert rounds[0]["clients_trained"] == 2
    # Round 2: client 1's process dies mid-round; the round ends within the timeout
    # without it, aggregated from the others and recorded. (In Ray simulation the dead
    # process was an actor serving several virtual clients: they fail with it.)
    assert rounds[1]["clients_failed"] + rounds[1]["clients_missing"] >= 1
    assert 1 <= rounds[1]["clients_trained"] <= 2 and not rounds[1]["skipped"]
    assert rounds[1]["wall_s"] < 150 + 30
    for name, value in final_weights(run_dir).items():
        assert torch.isfinite(value).all(), name
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["rounds"][0]["clients_rejected"] == 1
    # The killed client's reply never arrived: the report says its ledger may hold more.
    assert any("Client 1's reply for round(s) 2" in c for c in report["caveats"])
    assert time.monotonic() - started < 400


def start_simulate(args, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "simulate", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=child_env(),
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (Ray's included), by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid), *family] if psutil.pid_exists(proc.pid) else family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def kill_only(proc: subprocess.Popen, within_s: float = 20) -> None:
    """SIGKILL the `fedpriv simulate` process alone; every process it started must end by itself
    (server/runtime/superlink.py: the SuperLink, Flower's simulation process, Ray) within ``within_s``."""
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the run had started no process yet"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=within_s)
    left = [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    assert not left, f"still running {within_s} s after `fedpriv simulate` was killed: {left}"


def kill_after_round(args, run_dir: Path, tmp_path: Path, after: int, rounds: int, *, alone: bool = False) -> None:
    """Kill the run of ``rounds`` once ``after`` rounds are saved: its whole tree, or (``alone``)
    only itself, which leaves its ServerApp up to its watchdog's poll to notice (0.5 s)."""
    proc = start_simulate(args, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while len(metrics(run_dir)) < after:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        if alone:
            kill_only(proc)
    finally:
        kill_tree(proc)
    assert len(metrics(run_dir)) < rounds, "killed too late to test resume"


def resume_args(privacy: str, rounds: int = 4) -> list[str]:
    return [*FAST, "num_clients=2", f"rounds={rounds}", f"privacy={privacy}", ONE_ACTOR]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """One uninterrupted 4-round run without noise, shared: the resumed run's reference, and
    a finished run for the resume refusals (which work on a copy, never on this one)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = run_fedpriv(["simulate", *resume_args("none"), f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_sigkill_after_round_two_then_resume(tmp_path, privacy, request):
    # With privacy: only `fedpriv simulate` is killed, and nothing it started outlives it. Its
    # ServerApp notices within its watchdog's poll, in which 0.3 s rounds went on to the end of
    # 4 (a CI run): that variant has 10 rounds, so rounds are left to resume.
    rounds = 4 if privacy == "none" else 10
    common = resume_args(privacy, rounds)
    killed = tmp_path / "killed"
    kill_after_round(
        [*common, f"hydra.run.dir={killed}"], killed, tmp_path, after=2, rounds=rounds, alone=privacy == "sample"
    )
    # A SIGKILL leaves the run no time to remove its private folder (server/runtime/superlink.py) ...
    private = Path(re.search(r"private folder (\S+)", (killed / "cli.log").read_text()).group(1))
    assert private.is_dir()

    resumed = run_fedpriv(["simulate", f"resume={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    # ... so the next run removes it, and what Flower printed in it lands in the killed run's cli.log.
    assert not private.exists()
    assert "simulation SuperLink output (the run was killed; kept by the next run)" in (killed / "cli.log").read_text()
    assert [r["round"] for r in metrics(killed)] == list(range(1, rounds + 1))  # no round counted twice
    assert (killed / "privacy_report.json").exists()

    cfg = compose(common, killed)
    for client_id in ("0", "1"):
        ledger = Ledger.load(killed / "clients", client_id)
        assert sorted(e.round for e in ledger.rounds) == list(range(1, rounds + 1))  # each round in the ledger once
        assert {e.status for e in ledger.rounds} == {"trained"}

    if privacy == "sample":
        # Every client's history equals what an uninterrupted run spends: sigma calibrated once
        # for all rounds, each round's steps, nothing spent twice.
        report = json.loads((killed / "privacy_report.json").read_text())
        for client in report["sample_level"]["clients"]:
            from common.data.partition import load_client_data

            n = len(load_client_data(cfg, int(client["client_id"]))[0])
            q, steps = sample_rate(n, 32), steps_per_epoch(n, 32)
            sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=rounds * steps)
            assert client["history"] == [[sigma, q, rounds * steps]]
            assert len(client["per_round"]) == rounds
    else:
        # No noise: the resumed run ends on exactly the uninterrupted run's model.
        straight = request.getfixturevalue("straight_run")
        a, b = final_weights(killed), final_weights(straight)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_overrides_and_tampering(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)  # a finished 4-round run of our own to tamper with
    refused = run_fedpriv(["simulate", f"resume={run_dir}", "train.lr=0.5"], cwd=tmp_path, timeout=120)
    assert refused.returncode != 0 and "resume" in refused.stderr and "train.lr" in refused.stderr

    ckpt = run_dir / "checkpoints" / "round_0004.pt"  # the last completed round: what resume loads
    state = torch.load(ckpt, weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, ckpt)
    tampered = run_fedpriv(["simulate", f"resume={run_dir}", "rounds=5"], cwd=tmp_path, timeout=180)
    assert tampered.returncode != 0
    assert "SHA-256" in tampered.stdout + tampered.stderr
