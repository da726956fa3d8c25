"""What one SecAgg+ round costs at 10, 100 and 1,000 clients, and where the time goes.

One secure round of fedpriv's own code (``server.round.secagg.secagg_round``: Flower's
SecAgg+ workflow over the Grid) against real client handlers (``client.secagg``:
Flower's ``secaggplus_mod`` around fedpriv's answer, transparency log included), all in
this one process through the in-process grid of ``tests/server/test_secagg.py``: no
Ray, no messages over a wire, no training (each client's "update" is a fixed random
vector of the head's size, 77 classes x (384 + 1) = 29,645 floats). Everything the
protocol does is therefore done by this process, one client after another: the sum of
what a simulation on one machine spends on SecAgg+, which its workers can spread over
the cores.

Two variants per number of clients: ``before`` (``num_shares: 1.0``,
``reconstruction_threshold: 0.67``, the unmask stage rebuilding secrets with Flower's own
Shamir: the code and default before ``auto``) and ``auto`` (today's default: the degree
and threshold of ``common.secagg_graph.neighbourhood`` under ``secaggplus.corrupt_fraction``
/ ``secaggplus.dropout_fraction``, the server's reconstruction ``server.round.shamir``).
Per run: wall and CPU time of the round, the wall time of each of the protocol's four
stages split into the clients' part (inside the grid's send_and_receive) and the
server's, and of the cryptographic primitives (timed by wrapping Flower's functions where
its mod and workflow call them): Shamir splitting (clients) and reconstruction (server),
ECDH key agreement, key parsing, key generation, share encryption, mask expansion (the
PRG, one per neighbour and client, and the server's for the survivors' self masks).

``before`` at 1,000 clients would take days (Shamir splitting ∝ shares·t per client, so
n³ in all): it is predicted from the unit costs of the measured run at 100 clients, and
the same model predicts the measured run at 10 as a check. ``--simulate off auto`` adds
real ``fedpriv simulate`` runs (minilm_head on Banking77, 100 clients): the head rounds'
wall and CPU time without SecAgg+ and with its default. ``--quick``: 10 and 30 clients,
both variants, no simulation (well under a minute).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import defaultdict

import _common

HEAD = {"weight": (77, 384), "bias": (77,)}  # minilm_head on Banking77: 29,645 parameters
OLD = {"num_shares": 1.0, "reconstruction_threshold": 0.67}
SETTINGS = {
    "num_shares": "auto",
    "reconstruction_threshold": "auto",
    "corrupt_fraction": None,  # filled from conf/config.yaml
    "dropout_fraction": None,
    "clipping_range": 8.0,
    "quantization_range": 2**22,
    "modulus_range": 2**32,
}
#: Flower's functions timed, by the module that calls them -> the name they are reported under.
PRIMITIVES = {
    "flwr.client.mod.secure_aggregation.secaggplus_mod": {
        "generate_key_pairs": "client_keygen",
        "create_shares": "client_shamir_split",
        "generate_shared_key": "client_key_agreement",
        "encrypt": "client_encrypt_shares",
        "decrypt": "client_decrypt_shares",
        "pseudo_rand_gen": "client_mask_prg",
        "bytes_to_private_key": "client_parse_keys",
        "bytes_to_public_key": "client_parse_keys",
    },
    "server.round.shamir": {"combine_shares": "server_shamir_combine"},
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow": {
        "combine_shares": "server_shamir_combine",
        "generate_shared_key": "server_key_agreement",
        "pseudo_rand_gen": "server_mask_prg",
        "bytes_to_private_key": "server_parse_keys",
        "bytes_to_public_key": "server_parse_keys",
    },
}
STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


class Timers:
    """Seconds and calls per name, accumulated by the wrappers while ``active``."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self):
        self.seconds.clear()
        self.calls.clear()


def instrument(timers: Timers) -> None:
    import importlib

    from flwr.server.workflow import SecAggPlusWorkflow

    for module_name, names in PRIMITIVES.items():
        module = importlib.import_module(module_name)
        for attr, name in names.items():
            setattr(module, attr, timers.wrap(name, getattr(module, attr)))
    for stage in STAGES:
        setattr(SecAggPlusWorkflow, stage, timers.wrap(stage, getattr(SecAggPlusWorkflow, stage)))


def one_round(n: int, settings: dict, timers: Timers) -> dict:
    import torch

    from common.protocol import TrainInstruction
    from server.round.secagg import secagg_round
    from tests.server.test_secagg import InProcessGrid

    gen = torch.Generator().manual_seed(n)
    nodes = list(range(1000, 1000 + n))
    updates = {node: {k: torch.randn(s, generator=gen) * 1e-3 for k, s in HEAD.items()} for node in nodes}
    global_state = {k: torch.zeros(s) for k, s in HEAD.items()}
    grid = InProcessGrid(updates)
    # The clients' part of each stage: the grid runs every client's handler inside send_and_receive.
    stage_of_call = {}
    send = grid.send_and_receive

    def timed_send(messages, *, timeout=None):
        t0 = time.perf_counter()
        try:
            return send(messages, timeout=timeout)
        finally:
            stage_of_call[len(stage_of_call)] = time.perf_counter() - t0

    grid.send_and_receive = timed_send
    timers.reset()
    instruction = TrainInstruction("bench", 1, "{}", client_clip_norm=1.0)
    t0, c0 = time.perf_counter(), time.process_time()
    result = secagg_round(
        grid,
        nodes,
        global_state,
        instruction,
        server_round=1,
        settings=settings,
        clipping_range=1.0,
        timeout=None,
        run_id=7,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if result.secure_sum is None or len(result.trained) != n:
        raise SystemExit(f"the secure round failed at n={n}: {result.secure_error}")
    clients = [stage_of_call.get(i, 0.0) for i in range(len(STAGES))]
    stages = {
        stage.removesuffix("_stage"): {
            "wall_s": round(timers.seconds[stage], 3),
            "clients_s": round(c, 3),
            "server_s": round(timers.seconds[stage] - c, 3),
        }
        for stage, c in zip(STAGES, clients)
    }
    names = sorted({name for names in PRIMITIVES.values() for name in names.values()})
    primitives = {name: {"s": round(timers.seconds[name], 3), "calls": timers.calls[name]} for name in names}
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "stages": stages, "primitives": primitives}


class flower_unmask:
    """The code before fast reconstruction: the unmask stage rebuilds secrets with Flower's own Shamir."""

    def __enter__(self):
        from flwr.server.workflow import SecAggPlusWorkflow

        from server.round import secagg

        self.saved = secagg._Workflow.unmask_stage
        secagg._Workflow.unmask_stage = SecAggPlusWorkflow.unmask_stage

    def __exit__(self, *exc):
        from server.round import secagg

        secagg._Workflow.unmask_stage = self.saved


#: name -> (settings over the defaults, reconstruction with Flower's own Shamir). ``before``:
#: every client sharing with every other and Flower's reconstruction, the code before auto.
VARIANTS = {"auto": ({}, False), "before": (OLD, True)}


def predict(n: int, shares: int, t: int, ref: dict, flower_combine: bool) -> dict:
    """One round at ``n`` clients from the unit costs of the measured run ``ref`` (the same
    variant at fewer clients): Shamir splitting ∝ n·shares·t, reconstruction ∝ n·shares
    (Flower's: an inversion per share) or n·t (fedpriv's), the rest (key agreement, share
    encryption, mask expansion, messages, the clients' fixed work) ∝ n·shares."""
    rn, rs, rt = ref["n"], ref["num_shares"], ref["threshold"]
    split = ref["primitives"]["client_shamir_split"]["s"]
    combine = ref["primitives"]["server_shamir_combine"]["s"]
    rest = ref["wall_s"] - split - combine
    combine_scale = (n * shares) / (rn * rs) if flower_combine else (n * t) / (rn * rt)
    out = {
        "shamir_split_s": split * (n * shares * t) / (rn * rs * rt),
        "shamir_combine_s": combine * combine_scale,
        "rest_s": rest * (n * shares) / (rn * rs),
    }
    return {
        "predicted_wall_s": round(sum(out.values()), 1),
        **{k: round(v, 1) for k, v in out.items()},
        "from_n": rn,
    }


def graph(n: int, settings: dict) -> tuple[int, int]:
    """num_shares and threshold as Flower's setup stage derives them from what workflow_for hands it."""
    from common.secagg_graph import flower_share_count
    from server.round.secagg import workflow_for

    wf = workflow_for(settings, 1.0, None, sampled=n)
    shares = flower_share_count(wf.num_shares, n)
    t = wf.reconstruction_threshold
    return shares, (max(round(t * shares), 2) if isinstance(t, float) else t)


def simulate(name: str, settings: dict, n: int) -> dict:
    """One real run: ``fedpriv simulate`` of the default model (minilm_head) on Banking77, 3 rounds,
    with this SecAgg+ setting (``off``: secagg=false, the baseline). Round 1 is the DP prototype
    release, which also computes every client's MiniLM features once; rounds 2-3 train the head.
    Beside each round's wall time, the CPU seconds of the whole process tree (driver, Ray, the
    client workers) in rounds 2-3, which other jobs on a shared machine disturb far less."""
    import os
    import statistics
    import tempfile
    from pathlib import Path

    overrides = [
        *_common.dataset_overrides("banking77"),
        f"num_clients={n}",
        "rounds=3",
        "partition=iid",
        f"node_wait_s={max(120, n)}",
        f"round_timeout_s={max(600, 3 * n)}",
    ]
    if name == "off":
        overrides.append("secagg=false")
    else:
        overrides += ["secagg=true"] + [
            f"secaggplus.{key}={settings[key]}"
            for key in ("num_shares", "reconstruction_threshold", "corrupt_fraction", "dropout_fraction")
        ]
    print(f"{name}: fedpriv simulate {' '.join(overrides)} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedpriv-secagg-") as tmp:
        run = _common.simulate(overrides, Path(tmp) / "run", timeout=3600, memory=True)
    walls = [r["wall_s"] for r in run["rounds"]]
    at_end = run["memory"]["tree_cpu_s_at_round_end"]
    cpu = [round(b - a, 2) for a, b in zip(at_end, at_end[1:])]
    print(f"  rounds' wall: {walls}; CPU s of rounds 2..: {cpu}", flush=True)
    return {
        "overrides": overrides,
        "round_wall_s": walls,
        "head_round_wall_s": statistics.median(walls[1:]),
        "head_round_tree_cpu_s": cpu,
        "accuracy": [r.get("accuracy") for r in run["rounds"]],
        "command_wall_s": round(run["wall_s"], 1),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="*", help="numbers of clients (default 10 100 1000)")
    p.add_argument(
        "--measure-all-to-all-up-to",
        type=int,
        default=100,
        help="measure `before` (all-to-all) up to this many clients, predict beyond",
    )
    p.add_argument(
        "--simulate",
        nargs="*",
        default=[],
        choices=["off", "auto", "all-to-all"],
        help="also run `fedpriv simulate` (minilm_head on Banking77, --simulate-clients clients, 3 rounds) "
        "with these SecAgg+ settings (off: secagg=false), and report its rounds' wall and CPU times",
    )
    p.add_argument("--simulate-clients", type=int, default=100)
    p.add_argument("--only-simulate", action="store_true", help="skip the in-process rounds")
    p.add_argument("--corrupt-fraction", type=float, help="auto's assumption (default: conf/config.yaml's)")
    p.add_argument("--dropout-fraction", type=float, help="auto's assumption (default: conf/config.yaml's)")
    args = p.parse_args()
    started = time.monotonic()
    import logging

    from omegaconf import OmegaConf

    from tests.conftest import server_of_run

    conf = OmegaConf.load(_common.CONF / "config.yaml")["secaggplus"]
    base = {**SETTINGS, **{k: conf[k] for k in ("corrupt_fraction", "dropout_fraction")}}
    for key in ("corrupt_fraction", "dropout_fraction"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    clients = [] if args.only_simulate else (args.clients or ([10, 30] if args.quick else [10, 100, 1000]))
    machine = _common.machine()
    timers = Timers()
    instrument(timers)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # after Flower's import has set its own level
    runs: dict[str, dict] = {}
    with server_of_run():
        for n in clients:
            runs[str(n)] = {}
            for name, (over, flower_combine) in VARIANTS.items():
                settings = {**base, **over}
                shares, t = graph(n, settings)
                entry = {"n": n, "num_shares": shares, "threshold": t, "flower_reconstruction": flower_combine}
                if name != "auto" and n > args.measure_all_to_all_up_to:
                    entry["measured"] = False
                else:
                    print(f"n={n} {name}: num_shares={shares} threshold={t} ...", flush=True)
                    with flower_unmask() if flower_combine else contextlib.nullcontext():
                        entry.update(measured=True, **one_round(n, settings, timers))
                    print(f"  {entry['wall_s']} s, {entry['cpu_s']} s CPU", flush=True)
                runs[str(n)][name] = entry
    # Unmeasured runs predicted from the largest measured run of the same variant; measured
    # runs at fewer clients predicted too, as a check of the model.
    for name, (_, flower_combine) in VARIANTS.items():
        measured = [int(n) for n in runs if runs[n][name].get("measured")]
        if not measured:
            continue
        ref = runs[str(max(measured))][name]
        for n in runs:
            entry = runs[n][name]
            if int(n) != ref["n"]:
                entry["model"] = predict(int(n), entry["num_shares"], entry["threshold"], ref, flower_combine)
    for n, by in runs.items():
        parts = []
        for name, e in by.items():
            if e.get("measured"):
                took = f"{e['wall_s']} s ({e['cpu_s']} s CPU)"
            else:
                took = f"~{e['model']['predicted_wall_s']} s predicted"
            parts.append(f"{name}: shares={e['num_shares']} t={e['threshold']} {took}")
        print(f"n={n}: " + "; ".join(parts), flush=True)
    simulated = {}
    for name in args.simulate:
        settings = {**base, **(OLD if name == "all-to-all" else {})}
        simulated[name] = simulate(name, settings, args.simulate_clients)
    _common.write_json(
        args.out,
        {
            "benchmark": "secagg_cost",
            "quick": args.quick,
            "machine": machine,
            "vector_floats": sum(math.prod(s) for s in HEAD.values()),
            "assumptions": {k: base[k] for k in ("corrupt_fraction", "dropout_fraction")},
            "in_process": runs,
            "simulate": simulated,
        },
        started,
    )


if __name__ == "__main__":
    main()
