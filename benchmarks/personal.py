"""Personal models on the device: per-client accuracy of the global and the personal models.

10 clients, sample-level ε = 8 (the default privacy), the default model and recipe, each
client holding out ``data.client_test_fraction`` = 0.2 of its own data; after the last
round every device evaluates the global model on its held-out part, trains its personal
head (``personalize=finetune``, and ``mixture`` unless ``--methods`` says otherwise) and
evaluates it there. Settings (issue 30):

- ``pathological``: Banking77, each client 5 of the 77 intents (``partition=pathological
  partition.classes_per_client=5``, the default class assignment);
- ``dirichlet``: Banking77, Dirichlet(α = 0.1) label skew;
- ``preferences``: ``data=preferences`` over Banking77's texts and categories (each client
  one simulated user who likes 5 of the 77 topics; labels click/skip).

For every (setting, seed) the same run is made once per method and once with
``personalize=none``: its ledgers must equal the personalised runs' (no extra ε), which is
checked here (every client's Opacus history and ε). Runs go through the real round loop
(``server.round.loop.run_federation``) over the in-process Grid of real ClientApps
(``server.runtime.grid.InProcessGrid``), one after another; the runs of one (setting, seed)
share the clients' stored features (the first run computes them, the others find them in
their state directories, copied: they are the features each device would compute itself),
never a ledger.

    python benchmarks/personal.py --out benchmarks/results/personal.json          # 3 seeds, ~1 h on 2 cores
    python benchmarks/personal.py --quick --out /tmp/personal_quick.json          # one seed, pathological
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common

SEEDS = [0, 1, 2]
SETTINGS = {
    "pathological": ["partition=pathological", "partition.classes_per_client=5"],
    "dirichlet": ["partition=dirichlet", "partition.alpha=0.1"],
    "preferences": ["data=preferences", "data.label_column=category"],
}
#: The goals of issue 30.
GOALS = {
    "pathological": "personal mean >= 0.95 and >= 0.10 over the global model's mean on the same clients",
    "preferences": "personal mean >= 0.85 where the global model stays near the base rate",
    "all": "no extra epsilon: every ledger equals that of the same run with personalize=none",
}


def overrides(setting: str, seed: int, method: str, root: str, *, quick: bool) -> list[str]:
    data = (
        [f"data.path={root}/banking77/train.csv", f"data.test_path={root}/banking77/test.csv"]
        if setting == "preferences"
        else _common.dataset_overrides("banking77", root)
    )
    if setting == "preferences":
        data = ["data=preferences", *data]
    return [
        *data,
        *(o for o in SETTINGS[setting] if o != "data=preferences"),
        "num_clients=10",
        "privacy.sample.epsilon=8",
        "data.client_test_fraction=0.2",
        "evaluation.explain_inputs=0",
        f"personalize={method}",
        f"seed={seed}",
        *(["rounds=3"] if quick else []),
    ]


def one_run(cfg: dict, work: Path, features_from: Path | None) -> dict:
    """One run in ``work`` (its run directory and its clients' state directory)."""
    from server.round.loop import prepare, run_federation
    from server.runtime.grid import InProcessGrid, as_server_of_run

    state_dir = work / "clients"
    cfg["state_dir"] = str(state_dir)
    if features_from is not None:
        _copy_features(features_from, state_dir)
    started = time.perf_counter()
    as_server_of_run()
    report = run_federation(InProcessGrid(int(cfg["num_clients"])), prepare(cfg), work / "run", progress_bar=False)
    wall = time.perf_counter() - started
    ledgers = {
        d.name: json.loads((d / "ledger.json").read_text())
        for d in sorted(state_dir.iterdir())
        if (d / "ledger.json").is_file()
    }
    evaluation = report["evaluation"]
    return {
        "global_test_accuracy": evaluation["accuracy"],
        "per_client": evaluation["per_client"],
        "per_client_summary": evaluation["per_client_summary"],
        "epsilon": {c["client_id"]: c["epsilon"] for c in report["sample_level"]["clients"]},
        "histories": {cid: ledger["history"] for cid, ledger in ledgers.items()},
        "wall_s": round(wall, 1),
    }


def _copy_features(source: Path, target: Path) -> None:
    """The stored features (training and held-out parts) of each client, never its ledger."""
    for client in source.iterdir():
        if not client.is_dir():
            continue
        dest = target / client.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in client.glob("features-*.pt"):
            shutil.copy2(f, dest / f.name)
        if (client / "held-out").is_dir():
            shutil.copytree(client / "held-out", dest / "held-out", dirs_exist_ok=True)


def base_rate(rows: list[dict], cfg: dict) -> float | None:
    """Preferences: the share of the commonest label over the clients' held-out parts (what
    predicting one class scores), from the data as the clients split it."""
    from collections import Counter

    from common.data.partition import load_client_split

    counts: Counter = Counter()
    for row in rows:
        _, held_out, names = load_client_split(cfg, int(row["client_id"]))
        counts.update(held_out["label"])
    total = sum(counts.values())
    return max(counts.values()) / total if total else None


def _mean(values):
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 4) if values else None


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="*", type=int)
    p.add_argument("--methods", nargs="*", default=["finetune", "mixture"], choices=["finetune", "mixture"])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args()
    started = time.monotonic()
    machine = _common.machine()
    settings = ["pathological"] if args.quick else args.settings
    seeds = args.seeds if args.seeds else ([0] if args.quick else SEEDS)
    methods = ["finetune"] if args.quick else args.methods
    from server.runtime.compose import compose_config

    results: dict = {}
    for setting in settings:
        runs = []
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="fedpriv-personal-") as tmp:
                point: dict = {"seed": seed}
                first = None
                for method in [*methods, "none"]:
                    cfg, _ = compose_config(
                        [
                            *overrides(setting, seed, method, args.data_root, quick=args.quick),
                            *args.extra,
                            f"hydra.run.dir={tmp}/{method}/run",
                        ]
                    )
                    work = Path(tmp) / method
                    point[method] = one_run(cfg, work, first)
                    first = first or work / "clients"
                    print(
                        f"{setting} seed {seed} {method}: {json.dumps(point[method]['per_client_summary'])} "
                        f"({point[method]['wall_s']} s)",
                        flush=True,
                    )
                baseline = point["none"]
                point["ledgers_equal"] = {
                    m: point[m]["histories"] == baseline["histories"] and point[m]["epsilon"] == baseline["epsilon"]
                    for m in methods
                }
                if setting == "preferences":
                    point["base_rate"] = base_rate(baseline["per_client"], cfg)
                runs.append(point)
        results[setting] = summarise(runs, methods)
        _write(args, machine, started, results)
    _write(args, machine, started, results)


def summarise(runs: list[dict], methods: list[str]) -> dict:
    """Mean over the seeds of each run's per-client summary; every run kept."""
    out: dict = {"seeds": [r["seed"] for r in runs]}
    for method in methods:
        s = [r[method]["per_client_summary"] for r in runs]
        out[method] = {
            "global_mean": _mean(x["global"]["mean"] for x in s),
            "global_p10": _mean(x["global"]["p10"] for x in s),
            "global_worst": _mean(x["global"]["worst"] for x in s),
            "personal_mean": _mean(x["personal"]["mean"] for x in s),
            "personal_p10": _mean(x["personal"]["p10"] for x in s),
            "personal_worst": _mean(x["personal"]["worst"] for x in s),
            "global_test_accuracy": _mean(r[method]["global_test_accuracy"] for r in runs),
            "ledgers_equal_without_personalisation": all(r["ledgers_equal"][method] for r in runs),
        }
        out[method]["personal_minus_global"] = (
            round(out[method]["personal_mean"] - out[method]["global_mean"], 4)
            if out[method]["personal_mean"] is not None
            else None
        )
    out["none"] = {"global_mean": _mean(r["none"]["per_client_summary"]["global"]["mean"] for r in runs)}
    if any("base_rate" in r for r in runs):
        out["base_rate"] = _mean(r.get("base_rate") for r in runs)
    out["max_epsilon"] = max(max(r["none"]["epsilon"].values()) for r in runs)
    out["runs"] = [{k: v for k, v in r.items()} for r in runs]
    for r in out["runs"]:
        for m in [*methods, "none"]:
            r[m] = {k: v for k, v in r[m].items() if k != "histories"}
    return out


def _write(args, machine, started, results) -> None:
    _common.write_json(
        args.out,
        {
            "benchmark": "personal",
            "quick": args.quick,
            "machine": machine,
            "model": "minilm_head (the default)",
            "engine": "inprocess (server.round.loop over server.runtime.grid.InProcessGrid)",
            "goals": GOALS,
            "results": results,
        },
        started,
    )


if __name__ == "__main__":
    main()
