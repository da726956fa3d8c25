"""Privacy–utility on real data: final federated accuracy at sample-level ε ∈ {1, 3, 8} and without DP.

10 clients, Dirichlet(α = 0.5) label skew, the same seeds for every setting, each run a
real ``fedpriv simulate`` (minilm_lora by default); the accuracy is the server's
central test accuracy after the last round (metrics.jsonl). Writes the JSON and a
plot (accuracy vs ε, the non-private level as a line).

Data (paths relative to the repository root, as the DESIGN asks):
- Banking77: ../shared/data/banking77/{train,test}.csv (text, category; 77 labels)
- SMS Spam: ../shared/data/sms_spam_collection/SMSSpamCollection (tab-separated,
  no header, quoting off, duplicates dropped, 20 % stratified test split)
"""

from __future__ import annotations

import time
from pathlib import Path

import _common

DATASETS = {
    "banking77": ["data=csv", "data.path=../shared/data/banking77/train.csv",
                  "data.test_path=../shared/data/banking77/test.csv", "data.label_column=category"],
    "sms_spam": ["data=csv", "data.path=../shared/data/sms_spam_collection/SMSSpamCollection",
                 "data.delimiter=\\t", "data.column_names=[label,text]", "data.quoting=QUOTE_NONE",
                 "data.drop_duplicates=true", "data.test_fraction=0.2"],
}
LEVELS = ["1", "3", "8", "none"]
GOAL = 0.95  # accuracy at eps=8 over the non-private federated accuracy


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--rounds", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--levels", nargs="*", default=LEVELS)
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--plot", type=Path, help="PNG to write (default: next to --out)")
    args = p.parse_args()
    started = time.monotonic()
    machine = _common.machine()
    model = args.model or ("tiny_bert" if args.quick else "minilm_lora")
    rounds = args.rounds or (1 if args.quick else 5)
    datasets = args.datasets if not args.quick else ["sms_spam"]
    levels = args.levels if not args.quick else ["8", "none"]
    common = [f"model={model}", "num_clients=10", f"rounds={rounds}", "partition=dirichlet",
              "partition.alpha=0.5", "seed=0", *args.extra]
    if args.quick:
        # Mechanics only (tiny model, one round, ε=8 and none). IID so that every client
        # has the same q and σ is calibrated once: a Dirichlet split gives each client
        # its own q, and each calibration costs seconds of RDP (BENCHMARKS.md).
        common = [c for c in common if not c.startswith("partition")] + ["partition=iid", "train.max_length=24"]
    results: dict[str, dict] = {}
    import tempfile

    run_root = Path(tempfile.mkdtemp(prefix="fedpriv-utility-"))
    try:
        for ds in datasets:
            results[ds] = {}
            for level in levels:
                privacy = ["privacy=none"] if level == "none" else [f"privacy.sample.epsilon={level}"]
                run = _common.simulate([*common, *DATASETS[ds], *privacy], run_root / f"{ds}-{level}")
                acc = [r["accuracy"] for r in run["rounds"]]
                results[ds][level] = {"final_accuracy": acc[-1], "accuracy_per_round": acc,
                                      "wall_s": round(run["wall_s"], 1)}
                print(ds, level, results[ds][level], flush=True)
    finally:
        import shutil

        shutil.rmtree(run_root, ignore_errors=True)
    summary = {}
    for ds, res in results.items():
        if "8" in res and "none" in res:
            ratio = res["8"]["final_accuracy"] / res["none"]["final_accuracy"]
            summary[ds] = {"eps8_over_nonprivate": round(ratio, 3), "goal_met": ratio >= GOAL}
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, plot, model=model, rounds=rounds)
    _common.write_json(args.out, {
        "benchmark": "utility", "quick": args.quick, "machine": machine, "model": model, "rounds": rounds,
        "overrides": common, "results": results, "summary": summary, "plot": str(plot),
        "goal": f"accuracy at eps=8 >= {GOAL} x non-private federated accuracy",
    }, started)


def _plot(results: dict, path: Path, *, model: str, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (ds, res) in enumerate(results.items()):
        color = f"C{i}"
        eps = sorted(float(k) for k in res if k != "none")
        if eps:
            ax.plot(eps, [res[f"{e:g}"]["final_accuracy"] for e in eps], "o-", color=color, label=f"{ds} (DP)")
        if "none" in res:
            ax.axhline(res["none"]["final_accuracy"], color=color, ls="--", label=f"{ds} non-private")
    ax.set_xlabel("sample-level ε (δ = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{model}, 10 clients, Dirichlet α=0.5, {rounds} rounds", fontsize=9)
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 8])
    ax.set_xticklabels(["1", "3", "8"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
