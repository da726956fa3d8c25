"""Wall time per round and peak memory against the number of simulated clients.

The default job is the default recipe and model (``recipe=probe``, ``model=minilm_head``:
frozen MiniLM, round 1 the DP prototype release over features each client computes once
and caches in its state directory, later rounds DP-SGD on the head), every ``train.*``
and ``privacy.*`` setting at its default, 10 / 100 / 1,000 clients in one run each
(``--quick``: 4 and 8 clients of ``tiny_bert`` under the same recipe, 3 rounds).
Every client holds the same number of examples (the synthetic set grows with the
federation), so the work per round is proportional to the number of clients and a
framework whose per-client overhead does not grow keeps the time per client per round
flat. The figure per N is the median ``wall_s`` of rounds 2.. from ``metrics.jsonl``
(round 1 is the prototype release, which also computes every client's MiniLM features
once, and loads the model in every worker): sampling, messages, the clients' DP-SGD and
ledger commits, update checks, aggregation, evaluation, checkpoint, clients_reported.json.
Round 1 is reported per client too. Beside wall time, the CPU seconds of the whole
process tree per round (sampled as each round's metrics line appears), which other jobs
on a shared machine disturb far less, and the driver's alone (the server side and
Flower's engine). Peak memory is that of the whole process tree (``_common.TreeMemory``:
the simulate driver, Ray's processes and the client actors).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common

EXAMPLES_PER_CLIENT = 40
#: The former default job (tiny_bert fine-tuned through its encoder, 10 / 50 / 100 clients).
MODELS = {"minilm_head": [], "tiny_bert": ["model=tiny_bert"], "tiny_bert_finetune": _common.TINY_FINETUNE}


def _per_round(at_round_end: list[float]) -> list[float]:
    """CPU seconds of rounds 2.. from the totals sampled as each round ended."""
    return [round(b - a, 2) for a, b in zip(at_round_end, at_round_end[1:])]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="*")
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        help="minilm_head (default): the defaults; tiny_bert (default with --quick): the default "
        "recipe on tiny_bert's frozen features, whose start-up and features cost seconds less "
        "per run; tiny_bert_finetune: the former job (recipe=finetune)",
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()
    started = time.monotonic()
    model = args.model or ("tiny_bert" if args.quick else "minilm_head")
    clients = args.clients or ([4, 8] if args.quick else [10, 100, 1000])
    rounds = args.rounds or (3 if args.quick else 4)
    machine = _common.machine()
    per_n = {}
    with tempfile.TemporaryDirectory(prefix="fedpriv-scale-") as tmp:
        for n in clients:
            overrides = [
                *MODELS[model],
                f"num_clients={n}",
                f"rounds={rounds}",
                "partition=iid",
                f"data.train_size={EXAMPLES_PER_CLIENT * n}",
                "data.test_size=200",
                *args.extra,
            ]
            # A federation of N nodes waits for all N to register; at 1,000 that takes longer
            # than the 120 s default on 2 cores, and the round timeout scales likewise.
            overrides += [f"node_wait_s={max(120, n)}", f"round_timeout_s={max(600, 3 * n)}"]
            run = _common.simulate(overrides, Path(tmp) / f"n{n}", timeout=3600 + 10 * n, memory=True)
            walls = [r["wall_s"] for r in run["rounds"]]
            steady = statistics.median(walls[1:])
            cpu = _per_round(run["memory"]["tree_cpu_s_at_round_end"])
            driver_cpu = _per_round(run["memory"]["driver_cpu_s_at_round_end"])
            per_n[str(n)] = {
                "round_wall_s": walls,
                "steady_round_s": round(steady, 3),
                "per_client_round_s": round(steady / n, 4),
                "per_client_round1_s": round(walls[0] / n, 4),
                "round_cpu_s": cpu,
                "per_client_round_cpu_s": round(statistics.median(cpu) / n, 4),
                "round_driver_cpu_s": driver_cpu,
                "per_client_round_driver_cpu_s": round(statistics.median(driver_cpu) / n, 5),
                "command_wall_s": round(run["wall_s"], 1),
                "trained": [r["clients_trained"] for r in run["rounds"]],
                "accuracy": run["rounds"][-1]["accuracy"],
                "memory": run["memory"],
                "ru_maxrss_mib": run["ru_maxrss_mib"],
            }
            print(n, per_n[str(n)], flush=True)
    ns = sorted(int(k) for k in per_n)
    lo, hi = per_n[str(ns[0])], per_n[str(ns[-1])]
    # Flat: the time per client per round at the largest N is no more than at the
    # smallest (10% slack for a shared machine).
    growth = hi["per_client_round_s"] / lo["per_client_round_s"]
    # CPU time is sampled every 0.25 s (benchmarks._common.TreeMemory): a round shorter than
    # that can read as 0 CPU seconds (tiny_bert's head rounds on stored features take ~0.1 s).
    cpu_growth = (
        hi["per_client_round_cpu_s"] / lo["per_client_round_cpu_s"] if lo["per_client_round_cpu_s"] > 0 else None
    )
    _common.write_json(
        args.out,
        {
            "benchmark": "scale",
            "quick": args.quick,
            "machine": machine,
            "model": model,
            "overrides": [*MODELS[model], *args.extra],
            "examples_per_client": EXAMPLES_PER_CLIENT,
            "rounds": rounds,
            "clients": per_n,
            "per_client_cost_ratio_largest_over_smallest": round(growth, 3),
            "per_client_cpu_ratio_largest_over_smallest": None if cpu_growth is None else round(cpu_growth, 3),
            "goal": "cost per client per round flat in clients: at the largest N <= 1.1 x that at the smallest",
            "goal_met": growth <= 1.1,
        },
        started,
    )


if __name__ == "__main__":
    main()
