"""The same non-private job through fedpriv and through Apple's pfl-research, one after the other.

The job (the Flower-native issue's): all-MiniLM-L6-v2 with LoRA r = 8 (alpha 16) on every
layer's query and value, Banking77 from ../shared/data, 10 clients over a Dirichlet(0.5)
label split, every client in every round, 1 local epoch of batch 32 with AdamW (lr 5e-4,
a fresh optimizer per client and round), plain FedAvg with equal client weights, no DP on
either side (pfl has no sample-level DP), evaluation on the whole test set (3,080 texts)
after every round. ``--quick``: the synthetic set (600 training, 200 test texts, IID) instead.

Identical inputs: pfl gets fedpriv's own client partitions, tokenised by fedpriv
(max_length 40), and fedpriv's model object with the same seed, so both start from the
same weights and train on the same batches of the same clients. What differs is each
framework's machinery: fedpriv's Ray simulation (two client actors on two cores, with
ledgers, checks, checkpoints and the report) against pfl's in-process ``SimulatedBackend``
(one process, torch's threads). Seconds per round are the server's ``metrics.jsonl``
``wall_s`` for fedpriv and the time between pfl's ``after_central_iteration`` calls for pfl;
both include that round's central evaluation. Then fedpriv at its own defaults (the
recipe: DP prototypes and a DP head on cached features, ε = 8 — private, unlike the job)
for the time-to-accuracy comparison.

pfl is not a fedpriv dependency; install it beside fedpriv, e.g.::

    python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 && \\
        .venv-peers/bin/pip install -e . 'pfl[pytorch]==0.6.*'
    .venv-peers/bin/python benchmarks/peers/pfl_vs_fedpriv.py --out benchmarks/results/peers.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402

ROOT = _common.ROOT
BANKING = ROOT.parent / "shared" / "data" / "banking77"
DATA = [
    "data=csv",
    f"data.path={BANKING / 'train.csv'}",
    f"data.test_path={BANKING / 'test.csv'}",
    "data.text_column=text",
    "data.label_column=category",
    "partition=dirichlet",
    "partition.alpha=0.5",
]
QUICK_DATA = ["data=synthetic", "data.train_size=600", "data.test_size=200", "partition=iid"]
SPLIT = ["num_clients=10"]
JOB = [
    "privacy=none",
    "recipe=finetune",
    "model=minilm_lora",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "model.lora.target_modules=[query,value]",
    "train.local_epochs=1",
    "train.batch_size=32",
    "train.optimizer=adamw",
    "train.lr=5e-4",
    "evaluation.explain_inputs=0",
    "strategy.fraction_train=1.0",
]
LR = 5e-4


def fedpriv_run(overrides: list[str], run_dir: Path, timeout: float) -> dict:
    started = time.monotonic()
    out = subprocess.run(
        [Path(sys.executable).parent / "fedpriv", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"fedpriv simulate failed:\n{(out.stdout + out.stderr)[-3000:]}")
    from common.report import read_metrics

    rounds = read_metrics(run_dir)
    return {
        "overrides": overrides,
        "wall_s": round(time.monotonic() - started, 1),
        "round_s": [r["wall_s"] for r in rounds],
        "accuracy": [r["accuracy"] for r in rounds],
    }


def pfl_child(overrides_json: str, out_path: str) -> None:
    """pfl-research on fedpriv's own partitions and model (run in its own process)."""
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from common.data.partition import load_client_data
    from common.data.sources import load_splits
    from common.data.tokenizing import tokenize
    from common.model.factory import instantiate_model, load_tokenizer
    from common.model.state import model_inputs
    from server.runtime.compose import compose_config

    overrides = json.loads(overrides_json)
    cfg, _ = compose_config([*overrides, f"hydra.run.dir={tempfile.mkdtemp()}"])
    tok, max_length = load_tokenizer(cfg["model"]), int(cfg["train"]["max_length"])
    users = {}
    for pid in range(int(cfg["num_clients"])):
        part, names = load_client_data(cfg, pid)
        users[str(pid)] = tuple(tokenize(part, tok, max_length, names).tensors)
    _, test, names = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    central = Dataset(tuple(tokenize(test, tok, max_length, names).tensors))
    inner = instantiate_model(cfg, len(names))

    class Module(torch.nn.Module):
        """fedpriv's model with the two methods pfl's PyTorchModel calls."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def _logits(self, input_ids, attention_mask):
            return self.model(**model_inputs(input_ids, attention_mask)).logits

        def loss(self, input_ids, attention_mask, labels, eval=False):  # noqa: A002 - pfl's keyword
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self._logits(input_ids, attention_mask), labels)

        @torch.no_grad()
        def metrics(self, input_ids, attention_mask, labels, eval=True):  # noqa: A002
            self.eval()
            logits = self._logits(input_ids, attention_mask)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct = (logits.argmax(-1) == labels).sum().item()
            return {"loss": Weighted(loss, len(labels)), "accuracy": Weighted(correct, len(labels))}

    module = Module(inner)
    params = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=module, local_optimizer_create=torch.optim.AdamW, central_optimizer=torch.optim.SGD(params, lr=1.0)
    )  # SGD(1.0) on the mean update: FedAvg
    fed = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    rounds = int(cfg["rounds"])
    marks, accuracy = [time.monotonic()], []

    class Timed(CentralEvaluationCallback):
        """pfl's central evaluation, then the round's end time and its accuracy."""

        def on_train_begin(self, *, model):
            return Metrics()  # fedpriv does not score the initial model either

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            # pfl's own evaluation path, after every round (its callback skips iteration 0).
            stop, metrics = self._eval(model)
            accuracy.append(next(v for k, v in metrics.to_simple_dict().items() if "accuracy" in k))
            marks.append(time.monotonic())
            print(
                f"pfl round {central_iteration + 1}: {marks[-1] - marks[-2]:.1f} s, accuracy {accuracy[-1]:.4f}",
                flush=True,
            )
            return stop, metrics

    eval_params = NNEvalHyperParams(local_batch_size=int(cfg["evaluation"]["batch_size"]))
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds, evaluation_frequency=1, train_cohort_size=len(users), val_cohort_size=None
        ),
        backend=SimulatedBackend(training_data=fed, val_data=None, postprocessors=[]),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=LR, local_num_epochs=1, local_batch_size=int(cfg["train"]["batch_size"])
        ),
        model_eval_params=eval_params,
        callbacks=[Timed(central, model_eval_params=eval_params, frequency=1)],
    )
    Path(out_path).write_text(
        json.dumps(
            {
                "round_s": [round(b - a, 2) for a, b in zip(marks, marks[1:])],
                "accuracy": accuracy,
                "client_sizes": [len(u[0]) for u in users.values()],
                "test_size": len(central),
            }
        )
    )


def pfl_run(overrides: list[str], tmp: Path, timeout: float) -> dict:
    out = tmp / "pfl.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--pfl-child", json.dumps(overrides), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the pfl run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {"overrides": overrides, "wall_s": round(time.monotonic() - started, 1), **json.loads(out.read_text())}


def time_to(target: float, run: dict) -> float | None:
    """Seconds of rounds until the accuracy first reaches ``target`` (None: never)."""
    elapsed = 0.0
    for seconds, acc in zip(run["round_s"], run["accuracy"]):
        elapsed += seconds
        if acc >= target:
            return round(elapsed, 1)
    return None


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--pfl-child":
        return pfl_child(sys.argv[2], sys.argv[3])
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of the job (default 3, 2 with --quick)")
    args = p.parse_args()
    try:
        import pfl  # noqa: F401
    except ImportError:
        sys.exit("pfl-research is not installed here: see this script's docstring (pip install 'pfl[pytorch]==0.6.*')")
    started = time.monotonic()
    rounds = args.rounds or (2 if args.quick else 3)
    data = QUICK_DATA if args.quick else DATA
    job = [*data, *SPLIT, *JOB, f"rounds={rounds}"]
    with tempfile.TemporaryDirectory(prefix="fedpriv-peers-") as tmp:
        tmp = Path(tmp)
        print(f"pfl-research: {rounds} rounds ...", flush=True)
        pfl_side = pfl_run(job, tmp, timeout=600 * rounds)
        print(f"fedpriv: {rounds} rounds ...", flush=True)
        fed_side = fedpriv_run(job, tmp / "fedpriv", timeout=600 * rounds)
        print("fedpriv at its defaults (the recipe, eps 8) ...", flush=True)
        defaults = fedpriv_run([*data, *SPLIT, "evaluation.explain_inputs=0"], tmp / "defaults", timeout=900)

    def steady(run):  # from round 2 where there is one: round 1 also pays start-up
        later = run["round_s"][1:] or run["round_s"]
        return round(sum(later) / len(later), 2)

    target = round(max(pfl_side["accuracy"]), 4)
    _common.write_json(
        args.out,
        {
            "job": job,
            "machine": _common.machine(),
            "steady_round_s": {"fedpriv": steady(fed_side), "pfl": steady(pfl_side)},
            "round_time_ratio_fedpriv_over_pfl": round(steady(fed_side) / steady(pfl_side), 3),
            "goal_round_time_ratio": 1.0,
            "time_to_accuracy": {
                "target": target,
                "note": "the best accuracy pfl reached on the job",
                "pfl_s": time_to(target, pfl_side),
                "fedpriv_job_s": time_to(target, fed_side),
                "fedpriv_defaults_s": time_to(target, defaults),
            },
            "pfl": pfl_side,
            "fedpriv": fed_side,
            "fedpriv_defaults": defaults,
        },
        started,
    )


if __name__ == "__main__":
    main()
