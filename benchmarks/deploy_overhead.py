"""Deployment's per-message overhead and its round time against simulation, one job, one run.

The job is the local demo's (deploy/local-demo.sh): tiny_bert at its defaults, 2 clients (``--nodes``),
sample-level DP, 400 training and 80 test texts, batch 32; ``--rounds`` rounds (3 with
``--quick``). Both sides run here, one after the other:

- **Deployment**: a SuperLink and two SuperNodes on 127.0.0.1 (deploy/fedpriv-deploy.sh;
  insecure: TLS and node authentication are the local demo's, and on loopback they add a
  handshake per connection, not per-message work), then ``flwr run . --stream``. Each
  SuperNode's log is read as it is written and every line is stamped on arrival; with
  ``FEDPRIV_PROFILE`` each answered message appends its own timings on the device
  (client/app.py). A message's **overhead** is its time from "Receiving: train message" to
  "Sent successfully" at the SuperNode minus its local training (``train_s``: DP-SGD, or
  the prototype release), split into: waiting for its process, Python and Flower starting,
  fedpriv's imports, Flower's steps before our handler (message, FAB, app), our handler
  apart from training (data, model, features, ledger, reply), and the reply's way back to
  the SuperNode.
- **Simulation**: ``fedpriv simulate`` with the same overrides.

The round ratio compares steady rounds (from round 2: round 1 of the default recipe is the
prototype release, in which each client computes its features once) of the server's
``metrics.jsonl`` ``wall_s``. Every process started here is stopped by its pid.

    python benchmarks/deploy_overhead.py --out benchmarks/results/deploy_overhead.json
    python benchmarks/deploy_overhead.py --quick --out /tmp/deploy_overhead.json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common

ROOT = _common.ROOT
DEPLOY = ROOT / "deploy" / "fedpriv-deploy.sh"
BIN = Path(sys.executable).parent
GOAL_OVERHEAD_S = 3.0
JOB = ["model=tiny_bert", "privacy=sample", "data.train_size=400", "data.test_size=80", "train.batch_size=32"]
NODES = 2  # the local demo's; --nodes 1: one device alone, whose fresh process shares the CPU with nothing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StampedLog:
    """Lines of a growing log file, each stamped (Unix time) when it was first read."""

    def __init__(self, path: Path, interval: float = 0.02):
        self.path, self.interval, self.lines = path, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer, offset = b"", 0
        while True:
            stopping = self._stop.is_set()
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                now = time.time()
                self.lines.extend((now, line.decode(errors="replace")) for line in complete)
            if stopping:
                return
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join()
        return self.lines


def messages(lines: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """(received, sent) stamps of each train message a SuperNode answered, in order."""
    out, received = [], None
    for stamp, line in lines:
        if "Receiving: train message" in line:
            received = stamp
        elif "Sent successfully" in line and received is not None:
            out.append((received, stamp))
            received = None
    return out


def breakdown(received: float, sent: float, prof: dict) -> dict:
    """One message's time at the SuperNode, split (see the module's docstring)."""
    train = float(prof.get("train_s", 0.0))
    handler = prof["handler_ended"] - prof["handler_started"]
    started = prof["process_started"]
    warm = bool(prof.get("warm"))  # forked from fedpriv-superexec's parent: nothing to start or import
    parts = {
        "at_supernode_s": sent - received,
        "train_s": train,
        "overhead_s": sent - received - train,
        "process_wait_s": started - received if started else None,
        "python_flower_start_s": 0.0 if warm else (prof["import_started"] - started if started else None),
        "fedpriv_imports_s": 0.0 if warm else prof["imported"] - prof["import_started"],
        "flower_before_handler_s": prof["handler_started"] - (started if warm else prof["imported"]),
        "handler_besides_training_s": handler - train,
        "data_s": prof.get("data_s"),
        "model_s": prof.get("model_s"),
        "features_s": prof.get("features_s"),
        "reply_to_supernode_s": sent - prof["handler_ended"],
    }
    return {
        "round": prof.get("server_round"),
        "stage": prof.get("stage"),
        "warm": warm,
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in parts.items()},
    }


def rounds_of(run_dir: Path) -> dict:
    """The server's per-round wall times and accuracies, from its metrics.jsonl."""
    from common.report import read_metrics

    rounds = read_metrics(run_dir)
    return {"round_wall_s": [r["wall_s"] for r in rounds], "accuracy": [r["accuracy"] for r in rounds]}


def steady(walls: list[float]) -> float:
    return statistics.median(walls[1:]) if len(walls) > 1 else walls[0]


def deployment(tmp: Path, overrides: list[str], timeout: float, nodes: int, launcher: str) -> dict:
    procs, run_dir = tmp / "procs", tmp / "deploy-run"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PYTHONPATH": str(ROOT),
        "FLWR_HOME": str(tmp / "flwr"),
        "FEDPRIV_BIN": str(BIN),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FEDPRIV_LAUNCHER": launcher,
    }

    def deploy(*args, extra_env=None):
        out = subprocess.run(
            ["bash", str(DEPLOY), *map(str, args)],
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"fedpriv-deploy.sh {args[0]} failed:\n{out.stdout}{out.stderr}")

    port = free_port()
    link = f"127.0.0.1:{port}"
    logs: dict[str, StampedLog] = {}
    started = time.monotonic()
    try:
        deploy("superlink", procs, "127.0.0.1", port)
        deploy("connection", "bench", link)
        deadline = time.monotonic() + 60
        while (
            subprocess.run([BIN / "flwr", "supernode", "list", "bench"], env=env, capture_output=True).returncode != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError((procs / "superlink.log").read_text()[-3000:])
            time.sleep(0.5)
        for i in range(nodes):
            name = f"supernode-{i}"
            logs[name] = StampedLog(procs / f"{name}.log")
            node_cfg = (
                f'partition-id={i} num-partitions={nodes} client-id="device-{i}" state-dir="{tmp / "devices" / name}"'
            )
            deploy(
                "supernode",
                procs,
                name,
                link,
                free_port(),
                node_cfg,
                extra_env={"FEDPRIV_PROFILE": str(tmp / f"profile-{name}.jsonl")},
            )
        run = subprocess.run(
            [
                BIN / "flwr",
                "run",
                ".",
                "bench",
                "--stream",
                "--run-config",
                'overrides="' + " ".join([*overrides, f"hydra.run.dir={run_dir}"]) + '"',
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        from common.rundir import RunDir

        if not RunDir(run_dir).report_json.exists():
            raise RuntimeError(f"the deployment run wrote no report:\n{(run.stdout + run.stderr)[-3000:]}")
    finally:
        subprocess.run(["bash", str(DEPLOY), "stop", str(procs)], env=env, capture_output=True, timeout=90)
        stamped = {name: log.stop() for name, log in logs.items()}
    wall = time.monotonic() - started

    per_message = []
    for name, lines in stamped.items():
        profile = tmp / f"profile-{name}.jsonl"
        profs = [json.loads(line) for line in profile.read_text().splitlines()] if profile.exists() else []
        pairs = messages(lines)
        if len(pairs) != len(profs):
            raise RuntimeError(f"{name}: {len(pairs)} messages at the SuperNode, {len(profs)} profiled")
        per_message += [{"node": name, **breakdown(r, s, p)} for (r, s), p in zip(pairs, profs)]
    later = [m for m in per_message if m["round"] and m["round"] > 1]
    rounds = rounds_of(run_dir)

    def median(key, rows):
        values = [m[key] for m in rows if m[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "wall_s": round(wall, 1),
        **rounds,
        "steady_round_s": steady(rounds["round_wall_s"]),
        "overhead_s_median_from_round_2": median("overhead_s", later),
        "overhead_s_round_1": median("overhead_s", [m for m in per_message if m["round"] == 1]),
        "breakdown_median_from_round_2": {k: median(k, later) for k in per_message[0] if k.endswith("_s")}
        if later
        else None,
        "messages": per_message,
    }


def simulation(tmp: Path, overrides: list[str], timeout: float) -> dict:
    run_dir = tmp / "sim-run"
    started = time.monotonic()
    out = subprocess.run(
        [BIN / "fedpriv", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"fedpriv simulate failed:\n{(out.stdout + out.stderr)[-3000:]}")
    rounds = rounds_of(run_dir)
    return {"wall_s": round(time.monotonic() - started, 1), **rounds, "steady_round_s": steady(rounds["round_wall_s"])}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of the job (default 6, 3 with --quick)")
    p.add_argument("--nodes", type=int, default=NODES, help="SuperNodes = clients (default 2, the local demo's)")
    p.add_argument(
        "--launcher",
        choices=("warm", "flower"),
        default="warm",
        help="the SuperNodes' ClientApp launcher (deploy/fedpriv-deploy.sh FEDPRIV_LAUNCHER): "
        "fedpriv-superexec's warm forks (default) or Flower's fresh process per message",
    )
    args = p.parse_args()
    started = time.monotonic()
    rounds = args.rounds or (3 if args.quick else 6)
    overrides = [*JOB, f"num_clients={args.nodes}", f"rounds={rounds}"]
    with tempfile.TemporaryDirectory(prefix="fedpriv-deploy-overhead-") as tmp:
        tmp = Path(tmp)
        print(f"deployment: {rounds} rounds on {args.nodes} SuperNode(s), launcher {args.launcher} ...", flush=True)
        dep = deployment(tmp, overrides, timeout=120 + 60 * rounds, nodes=args.nodes, launcher=args.launcher)
        print(f"simulation: {rounds} rounds ...", flush=True)
        sim = simulation(tmp, overrides, timeout=120 + 30 * rounds)
    overhead = dep["overhead_s_median_from_round_2"]
    _common.write_json(
        args.out,
        {
            "job": overrides,
            "launcher": args.launcher,
            "machine": _common.machine(),
            "goal_overhead_s": GOAL_OVERHEAD_S,
            "overhead_s": overhead,
            "meets_goal": overhead is not None and overhead <= GOAL_OVERHEAD_S,
            "steady_round_ratio_deployment_over_simulation": round(dep["steady_round_s"] / sim["steady_round_s"], 2),
            "deployment": dep,
            "simulation": sim,
        },
        started,
    )


if __name__ == "__main__":
    main()
