"""Tuning sweeps for DP fine-tuning: many federated runs side by side, Ray left out.

Each run is the real round loop (``server.round.loop.run_federation``: the ClientApp's
rounds with ledger, σ calibrated for the planned run, budget check and DP-SGD, the
server's update checks, aggregation, mechanism, evaluation, checkpoints and report)
over an in-process Grid (``server.runtime.grid.InProcessGrid``) whose nodes run one after another
in the worker's process. Only Ray and Flower's transport are missing, which makes it
fast enough to sweep learning rate × clipping norm × batch size × local epochs, several
runs side by side. The tuned values then go
into ``conf/train/default.yaml`` and ``benchmarks/utility.py`` measures them through
``fedpriv simulate``.

Two steps, so the configuration is composed where Hydra and Flower are installed and
the runs go wherever the accelerator is:

    python benchmarks/tune.py compose --grid banking77 --out grid.json [--data-root DIR] [--model-path DIR]
    python benchmarks/tune.py run grid.json --out results.json [--workers 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import COMMON, DATASETS, dataset_overrides  # noqa: E402  the same runs as the utility figure


def _cross(*axes):
    """Every combination of the axes' override lists, as flat override lists."""
    return [[o for part in combo for o in part] for combo in itertools.product(*axes)]


# Named grids: lists of override lists. DP and non-private get their own learning
# rates (clipping bounds the DP step, so its best lr is larger). The first grids ran
# when minilm_lora's adapters were rank 8 on every query/value projection; they name
# that placement so that they rerun as they ran (results: benchmarks/results/tune_*.json).
QV8 = ["model.lora.r=8", "model.lora.target_modules=[query,value]"]
GRIDS = {
    "smoke": _cross([["rounds=1"]], [["privacy.sample.epsilon=8"], ["privacy=none"]]),
    "lr_batch_epochs": (
        _cross(
            [["rounds=5", "privacy.sample.epsilon=8", "train.optimizer=sgd", *QV8]],
            [[f"train.lr={lr}"] for lr in (1, 2, 4, 8)],
            [[f"train.batch_size={b}"] for b in (64, 256)],
            [[f"train.local_epochs={e}"] for e in (1, 3)],
        )
        + _cross(
            [["rounds=5", "privacy=none", "train.optimizer=sgd", *QV8]],
            [[f"train.lr={lr}"] for lr in (0.25, 0.5, 1, 2)],
            [[f"train.batch_size={b}"] for b in (64, 256)],
            [[f"train.local_epochs={e}"] for e in (1, 3)],
        )
    ),
    # SGD above learns slowly even without DP (best 0.48 on Banking77 in 5 rounds):
    # AdamW on the privatised gradient (post-processing: no privacy cost).
    "adamw": _cross(
        [["rounds=5", "train.optimizer=adamw", "train.batch_size=64", *QV8]],
        [["privacy.sample.epsilon=8"], ["privacy=none"]],
        [[f"train.lr={lr}"] for lr in (0.001, 0.003, 0.01)],
        [[f"train.local_epochs={e}"] for e in (1, 3)],
    ),
    # Noise goes into every trainable coordinate: LoRA rank 1 has 8x fewer adapter
    # weights than rank 8 for the noise to push around.
    "rank": (
        _cross(
            [["rounds=5", "privacy.sample.epsilon=8", "model.lora.r=1", QV8[1]]],
            [
                ["train.optimizer=sgd", "train.lr=1", "train.batch_size=64", "train.local_epochs=1"],
                ["train.optimizer=sgd", "train.lr=2", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=sgd", "train.lr=4", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.003", "train.batch_size=64", "train.local_epochs=1"],
                ["train.optimizer=adamw", "train.lr=0.003", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.01", "train.batch_size=256", "train.local_epochs=3"],
            ],
        )
        + [
            [
                "rounds=5",
                "privacy.sample.epsilon=8",
                *QV8,
                "train.optimizer=adamw",
                "train.lr=0.003",
                "train.batch_size=256",
                "train.local_epochs=3",
            ]
        ]
        + _cross(
            [["rounds=5", "privacy=none", "model.lora.r=1", QV8[1]]],
            [
                ["train.optimizer=sgd", "train.lr=2", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.003", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.01", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.01", "train.batch_size=64", "train.local_epochs=3"],
            ],
        )
    ),
    # Adapters on the last layer's value projection only (768 weights): the noise has
    # almost nothing but the head to push around.
    "last_layer": (
        _cross(
            [
                [
                    "rounds=5",
                    "privacy.sample.epsilon=8",
                    "model.lora.r=1",
                    "model.lora.target_modules=[5.attention.self.value]",
                ]
            ],
            [
                ["train.optimizer=sgd", "train.lr=1", "train.batch_size=64", "train.local_epochs=1"],
                ["train.optimizer=sgd", "train.lr=2", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=sgd", "train.lr=4", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.003", "train.batch_size=256", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.01", "train.batch_size=256", "train.local_epochs=3"],
            ],
        )
        + _cross(
            [["rounds=5", "privacy=none", "model.lora.r=1", "model.lora.target_modules=[5.attention.self.value]"]],
            [
                ["train.optimizer=sgd", "train.lr=1", "train.batch_size=64", "train.local_epochs=1"],
                ["train.optimizer=sgd", "train.lr=0.5", "train.batch_size=64", "train.local_epochs=3"],
                ["train.optimizer=adamw", "train.lr=0.01", "train.batch_size=64", "train.local_epochs=3"],
            ],
        )
    ),
    # Between the two: which adapter placements keep SMS Spam learning under DP.
    "placement": _cross(
        [
            [
                "rounds=5",
                "privacy.sample.epsilon=8",
                "train.optimizer=sgd",
                "train.lr=1",
                "train.batch_size=64",
                "train.local_epochs=1",
            ]
        ],
        [
            ["model.lora.r=2", "model.lora.target_modules=[4.attention.self.value,5.attention.self.value]"],
            ["model.lora.r=4", "model.lora.target_modules=[5.attention.self.query,5.attention.self.value]"],
            ["model.lora.r=8", "model.lora.target_modules=[5.attention.self.query,5.attention.self.value]"],
            ["model.lora.r=1", "model.lora.target_modules=[value]"],
        ],
    ),
    "sms": _cross(
        [["rounds=5", "train.batch_size=64", *QV8]],
        [["privacy.sample.epsilon=8"], ["privacy=none"]],
        [
            ["train.optimizer=adamw", "train.lr=0.003", "train.local_epochs=1"],
            ["train.optimizer=adamw", "train.lr=0.003", "train.local_epochs=3"],
            ["train.optimizer=sgd", "train.lr=1", "train.local_epochs=1"],
        ],
    ),
}


def compose_specs(named: list[tuple[str, list[str]]]) -> list[dict]:
    """One run spec {name, overrides, cfg} per (name, Hydra overrides), resolved as a run would."""
    from server.runtime.compose import compose_config  # Hydra and the packaged conf/ live here

    specs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in named:
            cfg, _ = compose_config([*overrides, f"hydra.run.dir={tmp}/run"])
            cfg["state_dir"] = None  # set per run by one_run
            specs.append({"name": name, "overrides": list(overrides), "cfg": cfg})
    return specs


def compose(args) -> None:
    data_root = args.data_root or str(ROOT.parent / "shared" / "data")
    base = [*COMMON, *dataset_overrides(args.dataset, data_root), *args.extra]
    if args.model_path:
        base.append(f"model.name_or_path={args.model_path}")
    runs = compose_specs([(" ".join(point), [*base, *point]) for point in GRIDS[args.grid]])
    Path(args.out).write_text(json.dumps({"dataset": args.dataset, "grid": args.grid, "runs": runs}, indent=1))
    print(f"{len(runs)} runs -> {args.out}")


def one_run(spec: dict, device: str) -> dict:
    import torch

    from common.report import read_metrics
    from server.round.loop import prepare, run_federation
    from server.runtime.grid import InProcessGrid, as_server_of_run

    cfg = spec["cfg"]
    cfg["train"]["device"] = device
    torch.set_num_threads(1)  # workers run side by side
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpriv-tune-") as tmp:
        cfg["state_dir"] = str(Path(tmp) / "clients")
        run_dir = Path(tmp) / "run"
        as_server_of_run()
        report = run_federation(InProcessGrid(int(cfg["num_clients"])), prepare(cfg), run_dir)
        rounds = read_metrics(run_dir)
    clients = report["sample_level"]["clients"]
    eps = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
    return {
        "name": spec["name"],
        "final_accuracy": rounds[-1]["accuracy"],
        "rounds": [{k: r[k] for k in ("round", "accuracy", "loss", "clients_trained")} for r in rounds],
        "max_client_epsilon": max(eps) if eps else None,
        "sigmas": [c["noise_multiplier"] for c in clients],
        "wall_s": time.perf_counter() - started,
    }


def _worker(args):
    spec, device = args
    try:
        return one_run(spec, device)
    except Exception as err:  # one bad point must not lose the sweep
        return {"name": spec["name"], "error": f"{type(err).__name__}: {err}"}


def run_specs(specs: list[dict], *, device: str, workers: int, on_result=None) -> list[dict]:
    """``one_run`` for every spec, ``workers`` processes side by side; results in finishing order."""
    import multiprocessing as mp

    results = []
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(_worker, [(spec, device) for spec in specs]):
            results.append(res)
            print(
                json.dumps(
                    {k: res.get(k) for k in ("name", "final_accuracy", "max_client_epsilon", "wall_s", "error")}
                ),
                flush=True,
            )
            if on_result:
                on_result(results)
    return results


def run(args) -> None:
    grid = json.loads(Path(args.grid_file).read_text())
    if args.more:  # several grid files in one sweep (one pool for all)
        for extra in args.more:
            more = json.loads(Path(extra).read_text())
            grid["runs"] += [{**spec, "name": f"{more['dataset']}: {spec['name']}"} for spec in more["runs"]]
            grid["dataset"] += f"+{more['dataset']}"
    started = time.perf_counter()
    # Written after every run: a sweep cut short keeps what it has.
    run_specs(
        grid["runs"],
        device=args.device,
        workers=args.workers,
        on_result=lambda results: _write(args.out, grid, args.device, started, results),
    )


def _write(path, grid, device, started, results) -> None:
    import platform

    import torch

    out = {
        "dataset": grid["dataset"],
        "grid": grid["grid"],
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "runs_planned": len(grid["runs"]),
        "wall_s": time.perf_counter() - started,
        "results": sorted(results, key=lambda r: -(r.get("final_accuracy") or -1)),
    }
    Path(path).write_text(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compose")
    c.add_argument("--dataset", choices=list(DATASETS), default="banking77")
    c.add_argument("--grid", choices=list(GRIDS), default="lr_batch_epochs")
    c.add_argument("--data-root")
    c.add_argument("--model-path")
    c.add_argument("--extra", nargs="*", default=[])
    c.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("grid_file")
    r.add_argument("--out", required=True)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--more", nargs="*", default=[], help="further grid files to run in the same pool")
    r.add_argument("--device", default="cpu")
    args = p.parse_args()
    compose(args) if args.cmd == "compose" else run(args)


if __name__ == "__main__":
    main()
