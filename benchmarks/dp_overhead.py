"""DP-SGD step time and peak memory over the same non-private step.

Two configurations, as a user would run them: ``minilm_lora`` with Opacus' per-example
hooks (train.grad_sample_mode=hooks, the default) and ``minilm_full`` (every weight
but the embeddings) with ghost clipping (train.grad_sample_mode=ghost). Batch 32,
sequence length 64, SGD, C = 1, σ = 1 (σ does not change the cost).

Time: the DP and the non-private step alternate in one process (after warm-up),
several repetitions; the figure is the median of the per-pair ratios, of CPU time
(the goal's figure: one torch thread, so the process' CPU time is the step's work and
other jobs on a shared machine barely move it) and of wall time.
Memory: a fresh child process per variant loads the model, settles (gc, malloc_trim),
then runs the steps while a thread samples its resident memory every millisecond;
peak RSS during training, DP over non-private (the goal's figure), and the increment
over the loaded-model baseline are reported.

``--quick`` keeps the first 2 of MiniLM's 6 layers (same widths, same kinds of
layers, so the same per-layer overheads) and fewer repetitions.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import _common

# case -> (model, grad_sample_mode); "ghost" is fedpriv's (lean first pass, client/training/ghost.py),
# "ghost_opacus" Opacus' own two full backward passes, for comparison.
CASES = {
    "minilm_lora": ("minilm_lora", "hooks"),
    "minilm_full": ("minilm_full", "ghost"),
    "minilm_full_opacus_ghost": ("minilm_full", "ghost_opacus"),
}
DEFAULT_CASES = ["minilm_lora", "minilm_full"]
GOALS = {"minilm_lora": 1.05, "minilm_full": 1.5, "minilm_full_opacus_ghost": 1.5}
MEMORY_GOAL = 1.1
BATCH, LENGTH = 32, 64


def batch(num_labels: int = 77, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (BATCH, LENGTH), generator=g)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[: BATCH // 2, LENGTH // 2 :] = 0  # half the batch padded, as real text is
    return ids, mask, torch.randint(0, num_labels, (BATCH,), generator=g)


LAYERS: int | None = None  # --quick: keep only the first layers


def stepper(model_name: str, mode: str | None):
    """A closure doing one training step, DP (``mode`` = hooks|ghost) or not (None).

    The DP wiring is local_train's: make_private with the same arguments (fixed-size
    batches here instead of Poisson sampling, so both sides see exactly 32 examples).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from common.model.state import model_inputs

    ids, mask, labels = batch()
    overrides = {"num_hidden_layers": LAYERS} if LAYERS else {}
    model = _common.build(model_name, 77, config_overrides=overrides)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4)
    criterion = F.cross_entropy
    if mode is not None:
        from opacus import PrivacyEngine

        private = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(ids, mask, labels), batch_size=BATCH),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode.removesuffix("_opacus"),
            criterion=nn.CrossEntropyLoss(),
            wrap_model=False,
        )
        if mode in ("ghost", "ghost_opacus"):
            _, optimizer, criterion, _ = private
            if mode == "ghost":  # what local_train uses: the lean first pass (client/training/ghost.py)
                from client.training.ghost import LeanGhostCriterion

                criterion = LeanGhostCriterion(criterion)
        else:
            _, optimizer, _ = private
    kwargs = model_inputs(ids, mask)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(**kwargs).logits, labels)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def time_case(model_name: str, mode: str, reps: int, steps_per_rep: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    plain, trainable = stepper(model_name, None)
    private, _ = stepper(model_name, mode)

    def many(fn):
        return lambda: [fn() for _ in range(steps_per_rep)]

    timed = _common.interleaved({"non_private": many(plain), "dp": many(private)}, reps=reps, warmup=warmup)
    wall = _common.paired_ratio(timed["samples_s"]["dp"], timed["samples_s"]["non_private"])
    cpu = _common.paired_ratio(timed["cpu_samples_s"]["dp"], timed["cpu_samples_s"]["non_private"])
    return {
        "trainable_parameters": trainable,
        "step_cpu_s_median": {k: round(v / steps_per_rep, 4) for k, v in timed["cpu_median_s"].items()},
        "step_wall_s_median": {k: round(v / steps_per_rep, 4) for k, v in timed["median_s"].items()},
        "cpu_samples_s": timed["cpu_samples_s"],
        "wall_samples_s": timed["samples_s"],
        "steps_per_sample": steps_per_rep,
        "time_ratio": round(cpu, 3),
        "wall_time_ratio": round(wall, 3),
    }


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (resource_page_kib())


def resource_page_kib() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") // 1024


def memory_child(model_name: str, mode: str, steps: int) -> None:
    """Run in a fresh process: RSS once loaded, and its peak during ``steps`` steps."""
    import threading

    import torch

    torch.set_num_threads(1)
    step, _ = stepper(model_name, None if mode == "none" else mode)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return load-time buffers to the OS
    except OSError:
        pass
    loaded = _rss_kib()
    peak = [loaded]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(steps):
        step()
    done.set()
    sampler.join()
    print(json.dumps({"loaded_kib": loaded, "peak_kib": max(peak[0], _rss_kib())}))


def memory_case(model_name: str, mode: str, steps: int, reps: int) -> dict:
    runs: dict[str, list[dict]] = {"non_private": [], "dp": []}
    for _ in range(reps):
        for label, m in (("non_private", "none"), ("dp", mode)):
            cmd = [sys.executable, __file__, "--memory-child", model_name, m, str(steps), str(LAYERS or 0)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = {k: statistics.median(r["peak_kib"] for r in v) for k, v in runs.items()}
    inc = {k: statistics.median(r["peak_kib"] - r["loaded_kib"] for r in v) for k, v in runs.items()}
    return {
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in peak.items()},
        "training_increment_mib": {k: round(v / 1024, 1) for k, v in inc.items()},
        "memory_ratio": round(peak["dp"] / peak["non_private"], 3),
        "increment_ratio": round(inc["dp"] / max(inc["non_private"], 1), 3),
    }


def main() -> None:
    global LAYERS
    if "--memory-child" in sys.argv:
        i = sys.argv.index("--memory-child")
        LAYERS = int(sys.argv[i + 4]) or None
        memory_child(sys.argv[i + 1], sys.argv[i + 2], int(sys.argv[i + 3]))
        return
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = the step's work)")
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES))
    args = p.parse_args()
    started = time.monotonic()
    import torch

    torch.set_num_threads(args.threads)
    machine = _common.machine()
    reps, steps, warmup, mem_steps, mem_reps = (3, 1, 1, 1, 1) if args.quick else (7, 2, 1, 3, 2)
    LAYERS = 2 if args.quick else None
    results = {}
    for name in args.cases:
        model_name, mode = CASES[name]
        case = {
            "model": model_name,
            "grad_sample_mode": mode,
            **time_case(model_name, mode, reps, steps, warmup),
            **memory_case(model_name, mode, mem_steps, mem_reps),
        }
        case["goal"] = f"time <= {GOALS[name]}x, memory <= {MEMORY_GOAL}x"
        case["goal_met"] = {"time": case["time_ratio"] <= GOALS[name], "memory": case["memory_ratio"] <= MEMORY_GOAL}
        results[name] = case
        print(
            name,
            json.dumps({k: case[k] for k in ("time_ratio", "wall_time_ratio", "memory_ratio", "step_cpu_s_median")}),
            flush=True,
        )
    _common.write_json(
        args.out,
        {
            "benchmark": "dp_overhead",
            "quick": args.quick,
            "machine": machine,
            "batch_size": BATCH,
            "max_length": LENGTH,
            "layers": LAYERS or 6,
            "settings": {
                "reps": reps,
                "steps_per_sample": steps,
                "warmup": warmup,
                "memory_steps": mem_steps,
                "memory_reps": mem_reps,
            },
            "cases": results,
        },
        started,
    )


if __name__ == "__main__":
    main()
