"""Wall time per round against the number of simulated clients (tiny_bert).

Every client holds the same number of examples (the synthetic set grows with the
federation), so the work per round is proportional to the number of clients and a
framework whose per-client overhead does not grow keeps the time per client per
round flat. The figure per N is the median ``wall_s`` of rounds 2.. (round 1 also
loads the model and tokenises in every worker) from ``metrics.jsonl``: sampling,
messages, client training (DP), update checks, aggregation, evaluation, checkpoint.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common

EXAMPLES_PER_CLIENT = 40


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="*")
    args = p.parse_args()
    started = time.monotonic()
    clients = args.clients or ([5, 10, 20] if args.quick else [10, 50, 100])
    rounds = 3 if args.quick else 4
    machine = _common.machine()
    per_n = {}
    with tempfile.TemporaryDirectory(prefix="fedpriv-scale-") as tmp:
        for n in clients:
            overrides = [*_common.TINY_FINETUNE, "train.local_epochs=1", f"num_clients={n}", f"rounds={rounds}", "partition=iid",
                         f"data.train_size={EXAMPLES_PER_CLIENT * n}", "data.test_size=200",
                         "train.batch_size=32"]
            run = _common.simulate(overrides, Path(tmp) / f"n{n}")
            walls = [r["wall_s"] for r in run["rounds"]]
            steady = statistics.median(walls[1:])
            per_n[str(n)] = {"round_wall_s": walls, "steady_round_s": round(steady, 3),
                             "per_client_round_s": round(steady / n, 4),
                             "command_wall_s": round(run["wall_s"], 1),
                             "trained": [r["clients_trained"] for r in run["rounds"]]}
            print(n, per_n[str(n)], flush=True)
    ns = sorted(int(k) for k in per_n)
    lo, hi = per_n[str(ns[0])], per_n[str(ns[-1])]
    # At most linear: the time per client per round at the largest N is no more than at
    # the smallest (10% slack for a shared machine).
    growth = hi["per_client_round_s"] / lo["per_client_round_s"]
    _common.write_json(args.out, {
        "benchmark": "scale", "quick": args.quick, "machine": machine, "model": "tiny_bert",
        "examples_per_client": EXAMPLES_PER_CLIENT, "rounds": rounds, "clients": per_n,
        "per_client_cost_ratio_largest_over_smallest": round(growth, 3),
        "goal": "cost grows at most linearly in clients: per-client round time at the largest N "
                "<= 1.1 x that at the smallest",
        "goal_met": growth <= 1.1,
    }, started)


if __name__ == "__main__":
    main()
